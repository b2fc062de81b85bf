"""The three scripts end to end on a tiny pack, and their one-line errors on bad input."""

import json
import os
import pickle

import numpy as np
import pytest

import evaluate
import prepare_data
import train
from tests.cli_helpers import script_error as _one_line_error


@pytest.fixture(scope="module")
def run_dir(tiny_pack, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(["--data", tiny_pack, "--output", out, "--batch-size", "12", "--max-steps", "2",
                       "--num-workers", "0", "--no-progress", "--targets", "lfw,cfp_fp", "--save-init",
                       "--log-every", "1"]) == 0
    return out


def test_train_writes_the_run_directory(run_dir):
    for f in ("config.json", "checkpoint.pt", "backbone.pt", "backbone_init.pt", "best.pt", "verification.json",
              "history.json", "loss.png", "train.log"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["backbone"] == "mobilefacenet" and cfg["max_steps"] == 2
    report = json.load(open(os.path.join(run_dir, "verification.json")))
    assert set(report["results"]) == {"lfw", "cfp_fp"}
    assert not os.path.exists(os.path.join(run_dir, "eval.json")), "eval.json is evaluate.py's alone"


def test_evaluate_run_dir_table_and_report(run_dir, tiny_pack, capsys, tmp_path):
    assert evaluate.main([run_dir, os.path.join(run_dir, "backbone_init.pt"), "--data", tiny_pack,
                          "--targets", "lfw,nosuch", "--no-progress", "--report", str(tmp_path),
                          "--save-embeddings", str(tmp_path / "emb")]) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | lfw | nosuch | mean |" in out and "missing" in out
    report = json.load(open(tmp_path / "eval.json"))
    assert report["missing_targets"] == ["nosuch"] and len(report["checkpoints"]) == 2
    lfw = report["checkpoints"][0]["results"]["lfw"]
    assert len(lfw["fold_accuracies"]) == 10 and 0.0 <= lfw["accuracy"] <= 1.0
    assert lfw["xnorm"] > 0 and set(lfw["tar_at_far"]) == {"0.0001", "0.001", "0.01"}
    assert "XNorm" in out and "TAR@FAR=1e-4" in out
    md = (tmp_path / "eval.md").read_text()
    assert md.count("| ") >= 3 and "How to read" in md and "population std" in md
    assert (tmp_path / "roc_backbone.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    emb = np.load(tmp_path / "emb" / "backbone" / "lfw.npy")
    assert emb.shape == (40, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)


def test_resume_continues_from_the_step(run_dir, tiny_pack):
    assert train.main(["--resume", run_dir, "--max-steps", "3"]) == 0
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "at step 2" in log
    assert json.load(open(os.path.join(run_dir, "history.json")))["step"][-1] == 3


def test_train_missing_data_dir(capsys, tmp_path):
    _one_line_error(capsys, train.main, ["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r")],
                    "train.py: error:", "nope", "no such file or directory")


def test_train_unknown_backbone_suggests(capsys, tiny_pack, tmp_path):
    _one_line_error(capsys, train.main, ["--data", tiny_pack, "--backbone", "mobilefacenett",
                                         "--output", str(tmp_path / "r")], "did you mean 'mobilefacenet'")


def test_evaluate_bin_with_wrong_count(capsys, run_dir, tmp_path):
    with open(tmp_path / "lfw.bin", "wb") as fh:
        pickle.dump(([b"x"] * 3, [True, False]), fh, protocol=4)
    _one_line_error(capsys, evaluate.main, [run_dir, "--data", str(tmp_path), "--no-progress",
                                            "--report", str(tmp_path / "report")], "evaluate.py: error:", "lfw.bin")


def test_evaluate_missing_checkpoint(capsys, tiny_pack, tmp_path):
    _one_line_error(capsys, evaluate.main, [str(tmp_path / "none.pt"), "--data", tiny_pack], "none.pt")


def test_evaluate_foreign_weights_need_backbone(capsys, tiny_pack, tmp_path):
    import torch

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    _one_line_error(capsys, evaluate.main, [str(tmp_path / "foreign.pth"), "--data", tiny_pack, "--no-progress"],
                    "--backbone")


@pytest.mark.parametrize("command", sorted(prepare_data.COMMANDS))
def test_prepare_data_help_has_example(capsys, command):
    with pytest.raises(SystemExit):
        prepare_data.main([command, "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and f"prepare_data.py {command.replace('_', '-')}" in out


def test_train_damaged_record_is_one_line(capsys, damaged_pack, tmp_path):
    err = _one_line_error(capsys, train.main, ["--data", damaged_pack, "--output", str(tmp_path / "r"),
                                               "--batch-size", "36", "--num-workers", "1", "--no-progress",
                                               "--max-steps", "1"], "train.py: error:", "train.rec")
    assert "record 10" in err and "magic" in err


def test_train_truncated_pack_is_one_line(capsys, tiny_pack, tmp_path):
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    rec = pack / "train.rec"
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size * 2 // 3])
    _one_line_error(capsys, train.main, ["--data", str(pack), "--output", str(tmp_path / "r")],
                    "train.py: error:", "train.rec record", "past the end")


@pytest.mark.parametrize("backbone", ["ir_se50", "efficientnet_b0"])
def test_other_backbones_train_and_evaluate(backbone, tiny_pack, tmp_path, capsys):
    out = str(tmp_path / backbone)
    assert train.main(["--data", tiny_pack, "--output", out, "--backbone", backbone, "--batch-size", "4",
                       "--max-steps", "2", "--num-workers", "0", "--no-progress", "--eval-every", "-1",
                       "--log-every", "1"]) == 0
    hist = json.load(open(os.path.join(out, "history.json")))
    assert len(hist["loss"]) == 2 and all(np.isfinite(hist["loss"]))
    assert evaluate.main([out, "--data", tiny_pack, "--targets", "lfw", "--no-progress", "--batch-size", "20"]) == 0
    assert backbone in json.load(open(os.path.join(out, "eval.json")))["checkpoints"][0]["backbone"]


def test_folder_of_three_checkpoints_gives_three_rows(run_dir, tiny_pack, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i in (1, 2, 10):
        shutil.copy(os.path.join(run_dir, "backbone.pt"), folder / f"epoch_{i}.pt")
    assert evaluate.main([str(folder), "--data", tiny_pack, "--targets", "lfw", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "epoch_" in line]
    assert [r.split(" | ")[0].rsplit("/", 1)[-1] for r in rows] == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]


def test_evaluate_wrong_shape_weights_is_one_line(capsys, tiny_pack, tmp_path):
    import torch

    import backbones

    sd = backbones.build("mobilefacenet").state_dict()
    sd["linear.weight"] = torch.zeros(256, 512)
    torch.save({"net_state_dict": sd}, tmp_path / "bad.pth")
    _one_line_error(capsys, evaluate.main, [str(tmp_path / "bad.pth"), "--backbone", "mobilefacenet",
                                            "--data", tiny_pack, "--no-progress"],
                    "evaluate.py: error:", "bad.pth", "wrong shape", "linear.weight")


def test_resume_auto_starts_fresh_then_resumes(tiny_pack, tmp_path):
    """What torchrun --max-restarts and requeued jobs rely on: the same command line twice."""
    out = str(tmp_path / "run")
    args = ["--data", tiny_pack, "--output", out, "--batch-size", "12", "--num-workers", "0", "--no-progress",
            "--eval-every", "-1", "--resume", "auto", "--backbone", "mobilefacenet"]
    assert train.main(args + ["--max-steps", "1"]) == 0
    assert train.main(args + ["--max-steps", "2"]) == 0
    log = open(os.path.join(out, "train.log")).read()
    assert log.count("resumed from") == 1 and "at step 1" in log
    assert ckpt_step(out) == 2


def ckpt_step(run):
    from engine.checkpoint import load_training_checkpoint

    return load_training_checkpoint(run)["step"]


def test_bad_sample_rate_is_one_line(capsys, tiny_pack, tmp_path):
    _one_line_error(capsys, train.main, ["--data", tiny_pack, "--output", str(tmp_path / "r"), "--sample-rate",
                                         "0.5"], "--partial-fc")
