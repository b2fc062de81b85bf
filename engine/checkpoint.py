"""Training checkpoints: everything needed to resume exactly (model, head, optimizer, scheduler,
scaler, step, RNG states, config), validated field by field on load, kept K at a time, and the
newest loadable one found for ``--resume auto``. Written and read through utils/torchfile.py.
"""

from __future__ import annotations

import os
import random
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Tuple

import numpy as np
import torch

from utils.torchfile import (
    CHECKPOINT_FORMAT,
    VERSION,
    CheckpointError,
    check_header,
    is_int,
    load_file,
    require_field,
    save_file,
    short_repr,
    tensor_field,
    typed_field,
)

MAX_STEP = 10**10  # optimizer steps: far beyond any run (1e10 steps at 1 ms each is 4 months)


def rng_state() -> Dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and Python, as weights_only-safe data."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Restore what rng_state() saved; a malformed state is one CheckpointError naming ``where``."""
    check_rng_state(state, where)
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: Any, where: str) -> None:
    """Refuse an RNG state set_rng_state could not restore (wrong type, size or range), naming the field."""
    def bad(field: str, want: str) -> CheckpointError:
        name = f"rng.{field}" if field else "rng"
        return CheckpointError(f"{where}: {name} is not {want}; the file is damaged or not from this code")

    if not isinstance(state, Mapping):
        raise bad("", "a mapping")
    t = state.get("torch")
    size = torch.get_rng_state().numel()
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == size):
        raise bad("torch", f"a uint8 tensor of {size} bytes")
    npst = state.get("numpy")
    if not isinstance(npst, Mapping):
        raise bad("numpy", "a mapping")
    keys = npst.get("keys")
    if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.dim() == 1 and keys.numel() == 624
            and bool(((keys >= 0) & (keys < 2**32)).all())):
        raise bad("numpy.keys", "624 integers in [0, 2**32)")
    if not is_int(npst.get("pos"), 0, 624):
        raise bad("numpy.pos", "an integer in [0, 624]")
    if not is_int(npst.get("has_gauss"), 0, 1):
        raise bad("numpy.has_gauss", "0 or 1")
    if not isinstance(npst.get("cached_gaussian"), (int, float)) or isinstance(npst.get("cached_gaussian"), bool):
        raise bad("numpy.cached_gaussian", "a number")
    py = state.get("python")
    if not (isinstance(py, (tuple, list)) and len(py) == 3 and is_int(py[0], 3, 3) and isinstance(py[1], (tuple, list))
            and len(py[1]) == 625 and all(is_int(v, 0, 2**32 - 1) for v in py[1]) and py[1][-1] <= 624
            and (py[2] is None or (isinstance(py[2], float)))):
        raise bad("python", "random.getstate()'s (3, 625 integers, None or float)")
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8
                                                    for c in cuda)):
        raise bad("cuda", "a list of uint8 tensors")


def numbered_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """The ``checkpoint-<step>.pt`` files in ``directory`` as (step, path), oldest first."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        m = _NUMBERED.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")


def save_training_checkpoint(path: str, keep: int = 1, **state: Any) -> None:
    """Write a resumable checkpoint; `state` holds state_dicts and counters (`step` among them).

    ``keep`` 1: ``path`` alone, replaced atomically. ``keep`` K > 1: the file is written as
    ``checkpoint-<step>.pt`` beside ``path``, ``path`` becomes a hard link to it (atomically, no
    second write), and only the K newest numbered files are kept.
    """
    obj = {"format": CHECKPOINT_FORMAT, "version": VERSION, **state}
    if keep <= 1:
        save_file(obj, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    numbered = os.path.join(directory, f"checkpoint-{int(state.get('step', 0)):08d}.pt")
    save_file(obj, numbered)
    link = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.link")
    try:
        if os.path.lexists(link):
            os.remove(link)
        os.link(numbered, link)
        os.replace(link, path)
    except OSError:  # a filesystem without hard links: a second, ordinary atomic write
        if os.path.lexists(link):
            os.remove(link)
        save_file(obj, path)
    for _, old in numbered_checkpoints(directory)[:-keep]:
        os.remove(old)


def validate_training_checkpoint(data: Any, path: str) -> Dict[str, Any]:
    """Refuse a training checkpoint whose fields the trainer could not use, naming the field."""
    data = check_header(data, path, CHECKPOINT_FORMAT, "training checkpoint")
    tensor_field(require_field(data, "model", path, "training checkpoint"), path, "model")
    step = require_field(data, "step", path, "training checkpoint")
    if not is_int(step, 0, MAX_STEP):
        raise CheckpointError(f"{path}: field 'step' is {short_repr(step)}, not a step count in 0..{MAX_STEP}")
    for key in ("head", "criterion", "optimizer", "scheduler", "scaler", "config"):
        typed_field(data, key, path, (Mapping,), "a mapping")
    typed_field(data, "best", path, (int, float), "a number")
    typed_field(data, "history", path, (Mapping, list), "a mapping of lists")
    if isinstance(data.get("history"), Mapping):
        for k, v in data["history"].items():
            if not isinstance(v, list):
                raise CheckpointError(f"{path}: history[{short_repr(k)}] is a {type(v).__name__}, not a list")
    for key, hi in (("skipped", MAX_STEP), ("world_size", 1 << 20), ("global_batch", 1 << 40)):
        if key in data and not is_int(data[key], 0 if key != "world_size" else 1, hi):
            raise CheckpointError(f"{path}: field {key!r} is {short_repr(data[key])}, not an integer in range")
    if "rng" in data:
        check_rng_state(data["rng"], path)
    if "ema" in data:  # --ema-decay (engine/ema.py): the averaged backbone and its update count
        typed_field(data, "ema", path, (Mapping,), "a mapping")
        tensor_field(require_field(data["ema"], "model", path, "training checkpoint's 'ema'"), path, "ema.model")
        if not is_int(data["ema"].get("updates", 0), 0, MAX_STEP):
            raise CheckpointError(f"{path}: field 'ema.updates' is {short_repr(data['ema'].get('updates'))}, "
                                  f"not a step count in 0..{MAX_STEP}")
    if "teacher" in data:  # a distilled run: the teacher's identity (engine/teacher.py)
        teacher = data["teacher"]
        if not (isinstance(teacher, Mapping) and isinstance(teacher.get("path"), str)
                and isinstance(teacher.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", teacher["sha256"])):
            raise CheckpointError(f"{path}: field 'teacher' is {short_repr(teacher)}, not {{'path': str, "
                                  f"'sha256': 64 hex digits}}")
    return data


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate `checkpoint.pt` (or the one inside a run directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    data = load_file(path, mmap=os.name == "posix")  # elsewhere a mapped file could not be replaced by the next save
    return validate_training_checkpoint(data, path)


def resumable_checkpoint(run_dir: str, note: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint ``--resume auto`` should use: checkpoint.pt if it loads, else the newest loading
    ``checkpoint-<step>.pt`` (``note`` gets one line saying why the newer file was skipped; default stderr).

    None when the run has no checkpoint at all (a fresh start). Hidden temporary files of a killed
    writer are never candidates. When checkpoints exist but none loads, raises CheckpointError rather
    than silently restarting the run from step 0 over them.
    """
    say = note or (lambda line: print(line, file=sys.stderr))
    main = os.path.join(run_dir, "checkpoint.pt")
    candidates = ([main] if os.path.lexists(main) else []) + [p for _, p in reversed(numbered_checkpoints(run_dir))]
    first_error: CheckpointError | None = None
    tried: List[str] = []
    for path in candidates:
        if any(_same_file(path, t) for t in tried):
            continue  # checkpoint.pt is a hard link to the newest numbered file: already refused
        tried.append(path)
        try:
            load_training_checkpoint(path)
        except CheckpointError as exc:
            first_error = first_error or exc
            say(f"resume: skipping {path}: {exc}")
            continue
        return path
    if first_error is not None:
        raise CheckpointError(f"{run_dir}: no checkpoint here loads ({first_error}); move the run aside to start "
                              f"afresh") from None
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
