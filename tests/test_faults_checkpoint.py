"""Checkpoint writes under faults, in child processes: kill -9 mid-write, a full disk, a read-only target.

Children are forked from the test process (torch already imported: a fork costs milliseconds, a
fresh interpreter seconds), killed or reaped with a bound, so nothing here can hang.
"""

import errno
import os
import random
import resource
import signal
import time

import pytest
import torch

import utils.torchfile as torchfile
from engine.checkpoint import (
    load_training_checkpoint,
    numbered_checkpoints,
    resumable_checkpoint,
    save_training_checkpoint,
)
from utils.torchfile import load_file, save_file

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _fork(body):
    """Run ``body()`` in a forked child; its exit status is 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not exist here: a parallel region could hang
            body()
            code = 0
        except BaseException as exc:  # reported through the exit status and stderr
            os.write(2, f"child: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    return pid


def _reap(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def _state(step):
    return {"step": step, "model": {"w": torch.full((5 << 20,), float(step))}}  # 20 MB of float32


def _assert_every_visible_checkpoint_loads(run):
    for name in os.listdir(run):
        if not name.startswith("."):
            state = load_training_checkpoint(os.path.join(run, name))
            assert state["model"]["w"][-1] == state["step"]  # written whole: the last value is the step


def test_kill_9_mid_write_never_leaves_a_torn_checkpoint(tmp_path):
    """8 children each save 20 MB checkpoints in a loop (keep=3) and are killed after a seeded random delay."""
    run = str(tmp_path)
    path = os.path.join(run, "checkpoint.pt")
    save_training_checkpoint(path, keep=3, **_state(1))
    rng = random.Random(1234)
    step = 1
    for kill in range(8):
        first = step + 1

        def body(first=first):
            for s in range(first, first + 1000):
                save_training_checkpoint(path, keep=3, **_state(s))

        pid = _fork(body)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _assert_every_visible_checkpoint_loads(run)
        found = resumable_checkpoint(run)
        assert found is not None
        step = load_training_checkpoint(found)["step"] + 1000 * (kill + 1)  # later children: larger steps
    # leftovers of killed writers are hidden temp files; the next save removes them (their pids are gone)
    for s in (step + 1, step + 2, step + 3):  # (under load a child may be killed before its first save ends)
        save_training_checkpoint(path, keep=3, **_state(s))
    assert not [n for n in os.listdir(run) if n.startswith(".")]
    assert load_training_checkpoint(path)["step"] == step + 3
    assert [s for s, _ in numbered_checkpoints(run)] == [step + 1, step + 2, step + 3]


def test_stale_temp_of_a_live_writer_is_kept(tmp_path):
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"  # our parent: alive
    dead = tmp_path / ".checkpoint.pt.999999999.tmp"  # beyond pid_max: no such process
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    save_file({"w": torch.ones(1)}, str(tmp_path / "checkpoint.pt"))
    assert live.exists() and not dead.exists()


def test_full_disk_is_one_oserror_naming_path_and_errno(tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG mid-save, as a full disk fails with ENOSPC."""
    path = str(tmp_path / "checkpoint.pt")
    save_file({"w": torch.ones(4)}, path)
    report = tmp_path / "report.txt"

    def body():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        try:
            save_file({"w": torch.zeros(1 << 20)}, path)  # 4 MB: over the 1 MB limit
        except OSError as exc:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            report.write_text(f"{exc.errno}\n{exc}")
            return
        raise AssertionError("the save succeeded over the file-size limit")

    assert _reap(_fork(body)) == 0
    code, msg = report.read_text().split("\n", 1)
    assert int(code) == errno.EFBIG
    assert msg.startswith("[Errno 27] File too large: could not write checkpoint") and path in msg
    assert "unexpected pos" not in msg and "\n" not in msg
    assert load_file(path)["w"].sum() == 4  # the previous checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "report.txt"]  # no temp file left


def test_unwritable_place_is_one_oserror():
    """As root a read-only directory still accepts files; sysfs refuses any new file, even root's."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs")
    path = "/sys/kernel/checkpoint.pt"
    with pytest.raises(OSError) as err:
        save_file({"w": torch.ones(1)}, path)
    assert err.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and path in str(err.value)
    assert not os.path.exists(path)


def test_read_only_filesystem_at_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    """EROFS at the rename (a filesystem remounted read-only mid-save), simulated by monkeypatching os.replace."""
    path = str(tmp_path / "checkpoint.pt")
    save_file({"w": torch.ones(4)}, path)

    def refuse(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    monkeypatch.setattr(torchfile.os, "replace", refuse)
    with pytest.raises(OSError, match=r"\[Errno 30\] Read-only file system: could not write checkpoint"):
        save_file({"w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert load_file(path)["w"].sum() == 4 and os.listdir(tmp_path) == ["checkpoint.pt"]
