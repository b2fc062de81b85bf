"""Training meets faults at the edges: NaN steps, undecodable data, signals, blocked workers,
failing evaluations. Each run goes through train.py main() on tiny settings; what is asserted
is what is left on disk and what was printed."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import train
from engine.checkpoint import load_training_checkpoint
from utils.torchfile import check_finite, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--batch-size", "4", "--num-workers", "0", "--no-progress", "--eval-every", "-1", "--log-every", "1"]


class NanLoss(nn.Module):
    """Cross-entropy whose value is NaN at the 1-based calls (= optimizer steps) ``bad`` says."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls, self.ce = bad, 0, nn.CrossEntropyLoss()

    def forward(self, logits, labels):
        self.calls += 1
        loss = self.ce(logits, labels)
        return loss * float("nan") if self.bad(self.calls) else loss


def _run(capsys, argv):
    """train.main(argv) -> (exit code, stdout lines, stderr lines)."""
    try:
        code = train.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.strip().splitlines()


def _assert_finite_run_files(run):
    state = load_training_checkpoint(str(run))
    check_finite(state["model"], "checkpoint model")
    check_finite(state["head"], "checkpoint head")
    if os.path.exists(run / "backbone.pt"):
        check_finite(load_file(str(run / "backbone.pt"))["state_dict"], "backbone.pt")
    return state


def test_nan_from_step_4_is_skipped_then_stops_keeping_the_last_good_checkpoint(tiny_pack, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setattr(train, "build_loss", lambda cfg: NanLoss(lambda call: call >= 4))
    run = tmp_path / "run"
    code, out, err = _run(capsys, ["--data", tiny_pack, "--output", str(run), "--max-steps", "20", "--save-every", "3",
                                   "--max-bad-steps", "3", "--scheduler", "constant", "--warmup-epochs", "0", *QUICK])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("train.py: error: step 6: 3 steps in a row skipped") and "loss nan" in err[0]
    assert "lr 0.1" in err[0] and f"{run}/checkpoint.pt (step 3)" in err[0]
    skipped = [line for line in out if "update skipped" in line]
    assert [line.split(":")[0] for line in skipped] == ["warning", "warning"] and "step 4:" in skipped[0]
    assert "(2 in a row, 2 in all)" in skipped[1]
    state = _assert_finite_run_files(run)
    assert state["step"] == 3 and state["bad_steps"] == 0
    assert json.load(open(run / "history.json"))["step"] == [1, 2, 3]


def test_lr_nan_writes_no_weights(tiny_pack, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(capsys, ["--data", tiny_pack, "--output", str(run), "--max-steps", "20", "--lr", "nan",
                                   "--max-bad-steps", "2", *QUICK])
    assert code == 2 and len(err) == 1 and "nan" in err[0], err  # our stop, or a refusal of the value up front
    assert not (run / "checkpoint.pt").exists() and not (run / "backbone.pt").exists()


def test_divergence_at_the_last_step_is_not_saved_and_skips_are_counted(tiny_pack, tmp_path, capsys, monkeypatch):
    """NaN at step 2 and at the last step (6): both skipped, the run ends, the files hold the good weights."""
    monkeypatch.setattr(train, "build_loss", lambda cfg: NanLoss(lambda call: call in (2, 6)))
    run = tmp_path / "run"
    code, out, err = _run(capsys, ["--data", tiny_pack, "--output", str(run), "--max-steps", "6", "--save-every",
                                   "5", "--max-bad-steps", "2", *QUICK])
    assert code == 0, err
    state = _assert_finite_run_files(run)
    assert state["step"] == 6 and state["bad_steps"] == 2 and state["history"]["bad_steps"] == [2, 6]
    assert json.load(open(run / "history.json"))["step"] == [1, 3, 4, 5]  # logged losses: good steps only
    assert all(math.isfinite(v) for v in state["history"]["loss"])
    assert sum(1 for line in out if "update skipped" in line) == 2


def test_weights_made_nan_by_the_last_update_are_never_written(tiny_pack, tmp_path, capsys):
    """A finite loss and gradient whose update leaves inf weights (an overflow) at the last step: no save."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []

    def overflow_at_step_4(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))

    handle = register_optimizer_step_post_hook(overflow_at_step_4)
    try:
        run = tmp_path / "run"
        code, out, err = _run(capsys, ["--data", tiny_pack, "--output", str(run), "--max-steps", "4", "--save-every",
                                       "3", *QUICK])
    finally:
        handle.remove()
    assert code == 2 and len(err) == 1, err
    assert "not writing a checkpoint" in err[0] and "NaN/inf" in err[0] and "(step 3)" in err[0]
    state = _assert_finite_run_files(run)
    assert state["step"] == 3


def test_keep_two_checkpoints(tiny_pack, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(capsys, ["--data", tiny_pack, "--output", str(run), "--max-steps", "3", "--save-every", "1",
                                 "--keep", "2", *QUICK])
    assert code == 0, err
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    assert load_training_checkpoint(str(run))["step"] == 3


def test_failing_evaluation_keeps_the_checkpoint_of_its_step(tiny_pack, tmp_path, capsys, monkeypatch):
    def broken(model):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(train, "make_evaluator", lambda cfg, device, log: broken)
    run = tmp_path / "run"
    argv = ["--data", tiny_pack, "--output", str(run), "--max-steps", "4", "--save-every", "2",
            "--batch-size", "12", "--num-workers", "0", "--no-progress", "--eval-every", "2"]
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train.main(argv)
    assert load_training_checkpoint(str(run))["step"] == 2


def _garbage_folder(root, classes=2, per_class=12):
    for c in range(classes):
        os.makedirs(root / f"id{c}")
        for i in range(per_class):
            (root / f"id{c}" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    return root


def _garbage_rec(pack, root):
    """The tiny pack's records rewritten by hand with a JPEG's magic and then nothing decodable."""
    import shutil
    import struct

    shutil.copytree(pack, root)
    data = bytearray((root / "train.rec").read_bytes())
    offsets = [int(line.split("\t")[1]) for line in (root / "train.idx").read_text().splitlines()]
    changed = 0
    for off in offsets:
        magic, lrec = struct.unpack_from("<II", data, off)
        length = lrec & ((1 << 29) - 1)
        body = data[off + 8:off + 8 + length]
        at = body.find(b"\xff\xd8\xff")
        if at >= 0:
            data[off + 8 + at + 3:off + 8 + length] = b"\0" * (length - at - 3)
            changed += 1
    assert changed == 36
    (root / "train.rec").write_bytes(bytes(data))
    return root


@pytest.mark.parametrize("kind", ["folder", "rec"])
def test_an_undecodable_dataset_stops_at_once_with_a_handful_of_lines(tiny_pack, tmp_path, capsys, kind):
    data = _garbage_folder(tmp_path / "data") if kind == "folder" else _garbage_rec(tiny_pack, tmp_path / "data")
    t0 = time.monotonic()
    code, out, err = _run(capsys, ["--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "50",
                                   *QUICK, "--batch-size", "12"])
    assert time.monotonic() - t0 < 60
    assert code == 2 and len(err) == 1, err
    assert "images read are undecodable (100.0%, more than --max-bad-fraction 0.01" in err[0]
    assert ("id0" in err[0] or "id1" in err[0]) if kind == "folder" else "train.rec record" in err[0]
    assert len(out) <= 8, out
    assert sum("skipped undecodable" in line for line in out) <= 2
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _script(body):
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import train
        from data.dataset import FaceDataset
        from tests import fault_sources
    """) + textwrap.dedent(body)


def _wait_for(predicate, proc, seconds, what):
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"never saw {what} (exit {proc.returncode}): {out[-2000:]} {err[-2000:]}")
        time.sleep(0.1)


def _sigterm_when(script, run, ready, what, timeout=60):
    """Start the script, send SIGTERM once ``ready()``, return (exit code, stdout, stderr); never hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(run.parent), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, proc, 120, what)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def test_sigterm_while_batches_are_skipped_stops_cleanly(tiny_pack, tmp_path):
    run = tmp_path / "run"
    script = _script(f"""
        train.build_dataset = lambda spec, decode=True: FaceDataset([fault_sources.SlowGarbageSource(600, 0.05)])
        sys.exit(train.main(["--data", {tiny_pack!r}, "--output", {str(run)!r}, "--max-steps", "5",
                             "--max-bad-fraction", "1", "--batch-size", "12", "--num-workers", "0",
                             "--no-progress", "--eval-every", "-1"]))
    """)
    log = run / "train.log"
    code, out, err = _sigterm_when(script, run, lambda: log.exists() and "skipped undecodable" in log.read_text(),
                                   "a skip warning")
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal SIGTERM at step 0" in out and "Traceback" not in err
    assert len(out.splitlines()) <= 8, out
    assert load_training_checkpoint(str(run))["step"] == 0


def test_sigterm_with_a_worker_blocked_on_a_fifo_stops_cleanly(tiny_pack, tmp_path):
    """The worker never returns a batch: the signal still ends in a checkpoint, and the worker is gone."""
    run, fifo, pid_file = tmp_path / "run", tmp_path / "fifo", tmp_path / "worker.pid"
    os.mkfifo(fifo)
    script = _script(f"""
        train.build_dataset = lambda spec, decode=True: FaceDataset([fault_sources.FifoSource({str(fifo)!r},
                                                                                              {str(pid_file)!r})])
        sys.exit(train.main(["--data", {tiny_pack!r}, "--output", {str(run)!r}, "--max-steps", "5",
                             "--batch-size", "12", "--num-workers", "1", "--no-progress", "--eval-every", "-1"]))
    """)
    t0 = time.monotonic()
    code, out, err = _sigterm_when(script, run, pid_file.exists, "the worker reading the FIFO")
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert time.monotonic() - t0 < 90
    assert "stopped by signal SIGTERM at step 0" in out and "Traceback" not in err
    assert load_training_checkpoint(str(run))["step"] == 0
    worker = int(pid_file.read_text())
    assert worker != os.getpid()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}"), "the blocked worker outlived the run"


def test_fifo_in_an_image_folder_is_skipped_like_an_undecodable_image(tmp_path):
    """A FIFO among a folder's images is refused unread and counted as a bad image, not fatal, not blocking."""
    import os

    import cv2
    import numpy as np

    from data.dataset import build_dataset

    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    ok, jpg = cv2.imencode(".jpg", np.full((112, 112, 3), 128, np.uint8))
    (root / "a" / "0.jpg").write_bytes(jpg.tobytes())
    os.mkfifo(root / "a" / "1.jpg")
    ds = build_dataset(str(root))
    labels = sorted(int(ds[i][1]) for i in range(len(ds)))
    assert labels == [-1, 0]
