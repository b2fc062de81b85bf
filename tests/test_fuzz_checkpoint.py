"""Seeded, bounded fuzzing of the checkpoint readers: damaged bytes load and validate, or raise our error.

Inputs are hand-made (torch.save of hand-built dicts, raw pickles), then truncated, bit-flipped,
lengthened or shortened at random. Every case runs in one forked child with a memory cap (a flipped
size field must not take the machine's memory) and a wall-clock bound (nothing may hang); the child
writes one line per unexpected outcome, which the test then asserts is empty.
"""

import json
import os
import pickle
import random
import resource
import signal
import time

import pytest
import torch

from backbones.weights import load_backbone_checkpoint, load_state_dict_file
from engine.checkpoint import load_training_checkpoint, rng_state
from utils.torchfile import BACKBONE_FORMAT, CHECKPOINT_FORMAT, CheckpointError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
CASES = 70  # mutations per base file (about 0.5 s per base)


class _Run:
    """Pickles to a reduce that would create a marker file: it must never exist."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bases(tmp_path, marker):
    model = {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_mean": torch.zeros(4), "fc.bias": torch.ones(8)}
    train = {"format": CHECKPOINT_FORMAT, "version": 1, "step": 42, "model": model, "head": {"w": torch.ones(3)},
             "best": 0.5, "skipped": 0, "history": {"loss": [1.0, 0.5]}, "rng": rng_state(),
             "config": {"backbone": "mbf", "embedding_size": 8}}
    back = {"format": BACKBONE_FORMAT, "version": 1, "backbone": "mbf", "embedding_size": 8,
            "channel_order": "bgr", "config": {}, "state_dict": model}
    files = {}
    for name, obj, kw in (("train.pt", train, {}), ("legacy.pt", train, {"_use_new_zipfile_serialization": False}),
                          ("backbone.pt", back, {}), ("foreign.pth", {"state_dict": model}, {}),
                          ("evil.pt", {"model": _Run(marker)}, {"pickle_module": pickle}),
                          ("evil_legacy.pt", {"model": _Run(marker)},
                           {"pickle_module": pickle, "_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save(obj, path, **kw)
        files[name] = path.read_bytes()
    files["evil.pkl"] = pickle.dumps(_Run(marker), protocol=2)  # a bare pickle: torch's legacy path
    return files


def _load(name, path):
    if name == "backbone.pt":
        return load_backbone_checkpoint(path)
    if name == "foreign.pth":
        return load_state_dict_file(path)
    return load_training_checkpoint(path)


def _mutate(data, rng):
    b = bytearray(data)
    kind = rng.choice(("truncate", "flip", "flip", "insert", "delete", "int"))
    at = rng.randrange(len(b))
    if kind == "truncate":
        return kind, bytes(b[:at])
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "insert":
        return kind, bytes(b[:at] + rng.randbytes(rng.randint(1, 16)) + b[at:])
    if kind == "delete":
        return kind, bytes(b[:at] + b[at + rng.randint(1, 16):])
    b[at:at + 8] = rng.choice((0xFFFFFFFF, 2**62, 1 << 33, 0)).to_bytes(8, "little")  # a size field gone wild
    return kind, bytes(b[:len(data)])


def _fuzz(tmp_path, marker, report):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))  # 3 GB beyond what is mapped now
    rng = random.Random(20240612)
    bad, counts = [], {"loaded": 0, "refused": 0}
    for name, data in _bases(tmp_path, marker).items():
        path = str(tmp_path / f"case-{name}")
        for i in range(CASES):
            kind, mutated = (("original", data) if i == 0 else _mutate(data, rng))
            with open(path, "wb") as fh:
                fh.write(mutated)
            t0 = time.monotonic()
            try:
                _load(name, path)
                counts["loaded"] += 1
                if name.startswith("evil"):
                    bad.append(f"{name} {kind} #{i}: loaded a pickle that needs code")
            except CheckpointError as exc:
                counts["refused"] += 1
                if kind == "original" and not name.startswith("evil"):
                    bad.append(f"{name}: the undamaged file is refused: {exc}")
                if "\n" in str(exc):
                    bad.append(f"{name} {kind} #{i}: message of several lines: {str(exc)[:200]!r}")
            except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
                bad.append(f"{name} {kind} #{i}: {type(exc).__name__}: {str(exc)[:200]}")
            if time.monotonic() - t0 > 5:
                bad.append(f"{name} {kind} #{i}: took {time.monotonic() - t0:.1f} s")
            if os.path.exists(marker):
                bad.append(f"{name} {kind} #{i}: the pickle's code RAN")
                os.remove(marker)
    report.write_text(json.dumps({"bad": bad, **counts}))


def test_fuzzed_checkpoints_load_or_raise_our_error(tmp_path):
    marker = str(tmp_path / "code-ran")
    report = tmp_path / "report.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not exist here: a parallel region could hang
            _fuzz(tmp_path, marker, report)
            code = 0
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"fuzz child: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the fuzz run hung (killed after 120 s)")
        time.sleep(0.02)
    assert status == 0, "the fuzz child crashed (see stderr)"
    got = json.loads(report.read_text())
    assert got["bad"] == [], "\n".join(got["bad"][:20])
    assert got["loaded"] >= 4 and got["refused"] >= 100, got  # both outcomes exercised
    assert not os.path.exists(marker)
