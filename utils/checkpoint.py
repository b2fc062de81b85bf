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
import sys
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Tuple

import numpy as np
import torch

from utils.files import check_regular

CHECKPOINT_FORMAT = "facetrain-checkpoint"
BACKBONE_FORMAT = "facetrain-backbone"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, malformed, unsafe or of an unknown format (one line)."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch's own test (torch.serialization._is_zipfile): else the legacy format
_CHUNK = 1 << 20  # bytes per read while checking CRCs
_MAX_INFLATE = 1000  # a compressed entry may grow at most this much (torch writes stored entries: ratio 1)
_BOILERPLATE = ("weights only load failed", "in pytorch 2.6", "check the documentation", "please file an issue",
                "re-running `torch.load`", "you can use", "to get the full", "alternatively")


def save_file(obj: Any, path: str) -> None:
    """torch.save to a hidden temporary file, then rename: a crash never leaves a torn file under ``path``.

    Any failure to write (full disk ENOSPC, file-size limit EFBIG, read-only EROFS/EACCES) is raised as
    one OSError naming ``path`` and the errno, the previous file intact and the temporary file removed
    (torch itself only reports "unexpected pos ..."). Temporary files of writers that died (kill -9)
    are removed here too: ``.NAME.<pid>.tmp`` whose pid is no longer running.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    sink = _Sink()
    try:
        with open(tmp, "wb") as f:
            sink.f = f
            torch.save(obj, sink)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint (a crash then keeps one)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        err = sink.error or (exc if isinstance(exc, OSError) else None)
        if err is None or err.errno is None:
            raise
        raise OSError(err.errno, f"{os.strerror(err.errno)}: could not write checkpoint (the previous one is kept)",
                      path) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class _Sink:
    """The file torch.save writes through: keeps the OSError that torch's writer turns into 'unexpected pos'."""

    def __init__(self) -> None:
        self.f: Any = None
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _remove_stale_temps(directory: str) -> None:
    """Remove hidden ``.NAME.pt.<pid>.tmp`` / ``.link`` files of writers that are gone (a live pid's are kept).

    Such files are what kill -9 or a power cut leaves mid-save; no reader ever looks at them
    (numbered_checkpoints and resumable_checkpoint match visible names only).
    """
    for entry in os.listdir(directory):
        m = _TEMP.fullmatch(entry)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, entry))
            except OSError:
                pass  # another writer removed it first


_TEMP = re.compile(r"\..+\.pth?\.(\d+)\.(?:tmp|link)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def verify_zip(path: str) -> None:
    """Check every entry of a zip-format torch file against the CRC-32 torch's writer stored for it.

    torch.load does not, so a flipped byte in a weight would load silently. One read of the file
    (the page cache then serves torch.load). Raises CheckpointError naming the damaged entry.
    """
    entry = "the zip directory"
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                entry = info.filename
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_INFLATE * max(
                        info.compress_size, 1):
                    raise CheckpointError(f"{path}: entry {_short(entry)} would inflate {info.compress_size} bytes to "
                                          f"{info.file_size}; refused (not a torch checkpoint)")
                with zf.open(info) as fh:
                    while fh.read(_CHUNK):
                        pass
    except CheckpointError:
        raise
    except Exception as exc:  # BadZipFile (bad CRC, torn header), EOFError, struct/zlib errors, ...
        raise CheckpointError(f"{path}: damaged: entry {_short(entry)} fails its check ({_first_line(exc)}); "
                              f"the file was altered or torn after it was written") from None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _refusal(exc: BaseException) -> str:
    """torch's weights_only message in a few words: which global or operation was refused."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = re.sub(r"^(posix|nt)\.", "os.", found.group(1))
        return f"refused to load: it needs code ({name})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and not ln.strip().lower().startswith(_BOILERPLATE)]
    reason = re.sub(r"^\w*Unpickler error:\s*", "", lines[0]) if lines else type(exc).__name__
    reason = reason if len(reason) <= 160 else reason[:160] + "..."
    if re.search(r"unsupported|not an allowed|not allowed|blocked", reason, re.I):
        return f"refused to load: {reason}"
    return f"not a readable checkpoint ({reason})"


def is_zip_format(path: str) -> bool:
    """Whether torch reads ``path`` as its zip format (else as the legacy pickle stream)."""
    with open(path, "rb") as fh:
        return fh.read(4) == _ZIP_MAGIC


def load_file(path: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, no code; damage refused.

    Zip-format files (all torch >= 1.6 writes, ours included) are checked entry by entry against their
    stored CRC-32s first (verify_zip). Legacy (non-zip) files carry no checksum: only their structure
    is checked, by torch while reading. ``mmap``: tensors stay in the file's pages until used
    (torch.load's mmap), so N ranks resuming from one checkpoint each read only their own shard of a
    2M-class centre matrix and share the page cache. Every failure is one CheckpointError line.
    """
    try:
        check_regular(path, "checkpoint file")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    zipped = is_zip_format(path)
    if zipped:
        verify_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_refusal(exc)}; only tensors and plain data are loaded") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable checkpoint (it asks for more memory than there is)") from None
    except Exception as exc:  # untrusted bytes: whatever torch's reader trips on is a damaged file, not our bug
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None


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
    if not _is_int(npst.get("pos"), 0, 624):
        raise bad("numpy.pos", "an integer in [0, 624]")
    if not _is_int(npst.get("has_gauss"), 0, 1):
        raise bad("numpy.has_gauss", "0 or 1")
    if not isinstance(npst.get("cached_gaussian"), (int, float)) or isinstance(npst.get("cached_gaussian"), bool):
        raise bad("numpy.cached_gaussian", "a number")
    py = state.get("python")
    if not (isinstance(py, (tuple, list)) and len(py) == 3 and _is_int(py[0], 3, 3) and isinstance(py[1], (tuple, list))
            and len(py[1]) == 625 and all(_is_int(v, 0, 2**32 - 1) for v in py[1]) and py[1][-1] <= 624
            and (py[2] is None or (isinstance(py[2], float)))):
        raise bad("python", "random.getstate()'s (3, 625 integers, None or float)")
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8
                                                    for c in cuda)):
        raise bad("cuda", "a list of uint8 tensors")


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: a garbage field may be a megabyte long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: Any, lo: int, hi: int) -> bool:
    """An int (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


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
            raise CheckpointError(f"{where}: tensor {_short(key)} holds {bad} NaN/inf value(s) of {value.numel()}; "
                                  f"these weights are unusable (a diverged run)")


MAX_STEP = 10**10  # optimizer steps: far beyond any run (1e10 steps at 1 ms each is 4 months)
MAX_EMBEDDING = 65536  # embedding sizes: checked before a model of that width is allocated
CHANNEL_ORDERS = ("rgb", "bgr")
WRAPPER_KEYS = ("state_dict", "net_state_dict", "model", "backbone")  # where foreign files keep their weights


def _format_of(data: Any) -> str | None:
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else None


def _check_header(data: Any, path: str, fmt: str, what: str) -> Dict[str, Any]:
    """The dict of one of our files, its format and version checked (a newer file is refused, not guessed)."""
    if not isinstance(data, dict) or _format_of(data) != fmt:
        raise CheckpointError(f"{path}: not a {what} of this project (no format={fmt!r})")
    version = data.get("version")
    if not _is_int(version, 1, 10**6):
        raise CheckpointError(f"{path}: field 'version' is {_short(version)}, not a format version (1..{VERSION})")
    if version > VERSION:
        raise CheckpointError(f"{path}: {what} format version {version} is newer than this code ({VERSION}); "
                              f"update the code to read it")
    return data


def _tensors(value: Any, path: str, field: str) -> Dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state_dict, or CheckpointError naming the field and the first bad entry."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: field {field!r} is a {type(value).__name__}, not a state_dict (name -> tensor)")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {field} entry {_short(k)} is a {type(v).__name__}, not a tensor")
    return dict(value)


def _require(data: Mapping[str, Any], key: str, path: str, what: str) -> Any:
    if key not in data:
        raise CheckpointError(f"{path}: no {key!r} field; a {what} needs it")
    return data[key]


def _typed(data: Mapping[str, Any], key: str, path: str, types: tuple, want: str) -> None:
    """An optional field of the right type (bool is not a number here)."""
    if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
        raise CheckpointError(f"{path}: field {key!r} is a {type(data[key]).__name__}, not {want}")


def validate_training_checkpoint(data: Any, path: str) -> Dict[str, Any]:
    """Refuse a training checkpoint whose fields the trainer could not use, naming the field."""
    data = _check_header(data, path, CHECKPOINT_FORMAT, "training checkpoint")
    _tensors(_require(data, "model", path, "training checkpoint"), path, "model")
    step = _require(data, "step", path, "training checkpoint")
    if not _is_int(step, 0, MAX_STEP):
        raise CheckpointError(f"{path}: field 'step' is {_short(step)}, not a step count in 0..{MAX_STEP}")
    for key in ("head", "criterion", "optimizer", "scheduler", "scaler", "config"):
        _typed(data, key, path, (Mapping,), "a mapping")
    _typed(data, "best", path, (int, float), "a number")
    _typed(data, "history", path, (Mapping, list), "a mapping of lists")
    if isinstance(data.get("history"), Mapping):
        for k, v in data["history"].items():
            if not isinstance(v, list):
                raise CheckpointError(f"{path}: history[{_short(k)}] is a {type(v).__name__}, not a list")
    for key, hi in (("skipped", MAX_STEP), ("world_size", 1 << 20), ("global_batch", 1 << 40)):
        if key in data and not _is_int(data[key], 0 if key != "world_size" else 1, hi):
            raise CheckpointError(f"{path}: field {key!r} is {_short(data[key])}, not an integer in range")
    if "rng" in data:
        check_rng_state(data["rng"], path)
    return data


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate `checkpoint.pt` (or the one inside a run directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    data = load_file(path, mmap=os.name == "posix")  # elsewhere a mapped file could not be replaced by the next save
    return validate_training_checkpoint(data, path)


def _model_fields(name: Any, emb: Any, order: Any, path: str, prefix: str) -> None:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: field '{prefix}backbone' is {_short(name)}, not an architecture name")
    if not _is_int(emb, 1, MAX_EMBEDDING):
        raise CheckpointError(f"{path}: field '{prefix}embedding_size' is {_short(emb)}, "
                              f"not an integer in 1..{MAX_EMBEDDING}")
    if not isinstance(order, str) or order not in CHANNEL_ORDERS:
        field = f"{prefix}input_order" if prefix else "channel_order"
        raise CheckpointError(f"{path}: field {field!r} is {_short(order)}, not one of {CHANNEL_ORDERS}")


def describe_backbone(data: Any, path: str) -> Dict[str, Any] | None:
    """What rebuilds the model of one of our files, validated; None for a file of another format.

    Returns ``{"backbone", "embedding_size", "channel_order", "state_dict", "config"}`` for a
    backbone.pt (its own fields) or a training checkpoint (its config; embedding 512, rgb if absent).
    """
    fmt = _format_of(data)
    if fmt == BACKBONE_FORMAT:
        _check_header(data, path, BACKBONE_FORMAT, "backbone file")
        state = _tensors(_require(data, "state_dict", path, "backbone file"), path, "state_dict")
        name, emb, order = data.get("backbone"), data.get("embedding_size"), data.get("channel_order")
        _model_fields(name, emb, order, path, "")
        config = data.get("config", {})
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{path}: field 'config' is a {type(config).__name__}, not a mapping")
    elif fmt == CHECKPOINT_FORMAT:
        validate_training_checkpoint(data, path)
        config = data.get("config", {})
        name, emb, order = config.get("backbone"), config.get("embedding_size", 512), config.get("input_order", "rgb")
        _model_fields(name, emb, order, path, "config.")
        state = data["model"]
    else:
        return None
    return {"backbone": name, "embedding_size": emb, "channel_order": order, "state_dict": state,
            "config": dict(config)}


def load_backbone_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a backbone.pt (or a training checkpoint's model) for evaluation or export.

    Returns ``{"backbone", "embedding_size", "channel_order", "state_dict", "config"}``; every
    field is checked before anything is built from it (a 10**9-wide embedding is refused unbuilt).
    """
    info = describe_backbone(load_file(path), path)
    if info is None:
        raise CheckpointError(f"{path}: not a backbone file of this project (no format={BACKBONE_FORMAT!r}); "
                              f"foreign weights need the architecture named")
    return info


def state_dict_of(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` weights of a foreign file: a raw state_dict or one under WRAPPER_KEYS.

    ``module.`` prefixes (DataParallel / DDP) are stripped.
    """
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (key -> tensor) or one wrapped under {WRAPPER_KEYS}, "
                              f"got {type(obj).__name__}")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {_short(k)} is a {type(v).__name__}, not a tensor; "
                                  f"not a backbone state_dict")
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


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
