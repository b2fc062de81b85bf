"""Versioned checkpoint files, written atomically and read without executing code.

Two kinds of file:
- `checkpoint.pt`: everything needed to resume exactly (model, head, optimizer,
  scheduler, scaler, step, RNG states, config).
- `backbone.pt`: the backbone's weights plus what is needed to rebuild it
  (name, embedding size, channel order), for evaluation, embedding and export.
Both are dicts with `format` and `version` keys so later readers can tell them
apart and migrate old files.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import zipfile
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

CHECKPOINT_FORMAT = "facetrain-checkpoint"
BACKBONE_FORMAT = "facetrain-backbone"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or of an unknown format."""


def save_file(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint (a crash then keeps one)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_file(path: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, no code.

    ``mmap``: tensors stay in the file's pages until used (torch.load's mmap), so N ranks
    resuming from one checkpoint each read only their own shard of a 2M-class centre
    matrix, and share the page cache, instead of N full copies in host memory. Files in
    torch's legacy (non-zip) format are read the ordinary way.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load (holds more than tensors and plain data: {first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None


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


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def check_finite(state_dict: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError naming the first floating tensor of ``state_dict`` holding NaN or inf."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{where}: tensor {key!r} holds {bad} NaN/inf value(s) of {value.numel()}; "
                                  f"these weights are unusable (a diverged run)")


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read `checkpoint.pt` (or the one inside a run directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    data = load_file(path, mmap=os.name == "posix")  # elsewhere a mapped file could not be replaced by the next save
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (no format={CHECKPOINT_FORMAT!r})")
    if int(data.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {data['version']} is newer than this code ({VERSION})")
    return data


def save_backbone(path: str, state_dict: Mapping[str, torch.Tensor], backbone: str, embedding_size: int,
                  channel_order: str, config: Mapping[str, Any] | None = None, **extra: Any) -> None:
    """Write the evaluation/export file: weights and how to rebuild the model."""
    save_file({"format": BACKBONE_FORMAT, "version": VERSION, "backbone": backbone,
               "embedding_size": int(embedding_size), "channel_order": channel_order,
               "config": dict(config or {}), "state_dict": dict(state_dict), **extra}, path)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, for reports that say exactly what was evaluated."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
