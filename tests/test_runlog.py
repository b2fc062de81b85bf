"""The run log: lines to train.log, history to history.json/loss.png, the latest verification to
verification.json; other ranks keep the history but write and print nothing."""

import json

import torch

from engine.distributed import DistInfo
from engine.runlog import LossWindow, RunLog

REPORT = {"mean_accuracy": 0.9, "results": {"lfw": {"accuracy": 0.95, "xnorm": 3.0, "num_pairs": 600},
                                           "cfp_fp": {"accuracy": 0.85, "xnorm": 1.0}}}


def test_lines_go_to_the_screen_and_train_log(tmp_path, capsys):
    log = RunLog(str(tmp_path), progress=False)
    log("first")
    log("second")
    assert (tmp_path / "train.log").read_text() == "first\nsecond\n"
    assert capsys.readouterr().out == "first\nsecond\n"


def test_a_window_without_a_bar_is_a_plain_line_and_a_history_entry(tmp_path):
    log = RunLog(str(tmp_path), progress=False)
    log.window(step=20, total_steps=100, epoch=1, loss=2.5, lr=0.05, img_per_s=123.4)
    assert (tmp_path / "train.log").read_text() == "step 20/100 epoch 1 loss 2.5000 lr 0.05 123.4 img/s\n"
    assert (log.history["step"], log.history["loss"], log.history["lr"]) == ([20], [2.5], [0.05])


def test_the_fp16_loss_scale_is_logged_when_given(tmp_path):
    log = RunLog(str(tmp_path), progress=False)
    log.window(step=20, total_steps=100, epoch=1, loss=2.5, lr=0.05, img_per_s=123.4, scale=32768.0)
    log.window(step=40, total_steps=100, epoch=1, loss=2.0, lr=0.05, img_per_s=120.0)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0] == "step 20/100 epoch 1 loss 2.5000 scale 32768 lr 0.05 123.4 img/s"
    assert "scale" not in lines[1] and log.history["scale"] == [32768.0]


def test_an_evaluation_writes_verification_json_and_a_history_summary(tmp_path):
    log = RunLog(str(tmp_path), progress=False)
    log.evaluation(7, REPORT)
    assert json.loads((tmp_path / "verification.json").read_text()) == dict(REPORT, step=7)
    assert log.history["eval"] == [{"step": 7, "mean_accuracy": 0.9, "accuracy": {"lfw": 0.95, "cfp_fp": 0.85}}]
    line = "step 7: verification lfw 95.00, cfp_fp 85.00 | mean 90.00%, XNorm 2\n"
    assert (tmp_path / "train.log").read_text() == line
    assert not (tmp_path / "eval.json").exists()  # evaluate.py's name and schema


def test_history_json_and_loss_png(tmp_path):
    log = RunLog(str(tmp_path), progress=False)
    log.window(1, 2, 0, 3.0, 0.1, 10.0)
    log.bad_step(2, 1)
    log.write_history()
    assert json.loads((tmp_path / "history.json").read_text()) == {
        "step": [1], "loss": [3.0], "lr": [0.1], "eval": [], "bad_steps": [2]}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_history_continues(tmp_path):
    log = RunLog(str(tmp_path), progress=False)
    log.restore({"step": [5], "loss": [1.0], "lr": [0.1], "eval": []})  # written before bad_steps existed
    log.bad_step(6, 1)
    assert log.history == {"step": [5], "loss": [1.0], "lr": [0.1], "eval": [], "bad_steps": [6]}


def test_other_ranks_keep_history_but_write_nothing(tmp_path, capsys):
    log = RunLog(str(tmp_path), main=False)
    log.open(10, 0)
    log("hidden")
    log.bad_step(3, 1)
    log.evaluation(3, REPORT)
    log.write_history()
    log.close()
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    assert log.history["bad_steps"] == [3] and len(log.history["eval"]) == 1


def test_a_loss_window_logs_the_mean_of_its_good_steps_and_starts_afresh(tmp_path):
    """Two good steps (1.0, 2.0; a skipped one is never added) -> one entry 1.5; a window with no good
    step logs nothing; the next window holds only its own steps."""
    log = RunLog(str(tmp_path), progress=False)
    window = LossWindow(log, DistInfo(), torch.device("cpu"), global_batch=8, distill=True)
    window.add(torch.tensor(1.0), torch.tensor(0.25))
    window.add(torch.tensor(2.0), torch.tensor(0.75))
    window.flush(step=3, total_steps=9, epoch=0, lr=0.1, scale=None)
    window.flush(step=6, total_steps=9, epoch=0, lr=0.1, scale=None)  # every step skipped: no entry
    window.add(torch.tensor(4.0), torch.tensor(0.0))
    window.flush(step=9, total_steps=9, epoch=1, lr=0.0, scale=None)
    assert (log.history["step"], log.history["loss"], log.history["distill"]) == ([3, 9], [1.5, 4.0], [0.5, 0.0])
