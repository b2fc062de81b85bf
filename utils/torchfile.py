"""Our torch files (checkpoints, backbone files) written atomically and read without executing code.

The ground every reader of a ``.pt`` stands on: ``save_file`` (hidden temporary file, fsync,
rename; a write failure is one OSError naming the path and errno), ``load_file`` (torch.load
with weights_only=True, zip CRC-32s verified first, every failure one CheckpointError line),
and the field checks the two formats built on them share (engine/checkpoint.py: training
checkpoints; backbones/weights.py: backbone files and foreign weights). Both formats are dicts
with ``format`` and ``version`` keys so later readers can tell them apart and migrate old files.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, Mapping

import torch

from utils.atomic import atomic_path
from utils.errors import UserError
from utils.files import check_regular

VERSION = 1


CHECKPOINT_FORMAT = "facetrain-checkpoint"


BACKBONE_FORMAT = "facetrain-backbone"


class CheckpointError(UserError, ValueError):
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
    sink = _Sink()
    try:
        with atomic_path(path) as tmp:  # fsync, then rename: a crash keeps the old file or the new one
            with open(tmp, "wb") as f:
                sink.f = f
                torch.save(obj, sink)
    except (OSError, RuntimeError) as exc:
        err = sink.error or (exc if isinstance(exc, OSError) else None)
        if err is None or err.errno is None:
            raise
        raise OSError(err.errno, f"{os.strerror(err.errno)}: could not write checkpoint (the previous one is kept)",
                      path) from None


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
                    raise CheckpointError(f"{path}: entry {short_repr(entry)} would inflate {info.compress_size} "
                                          f"bytes to {info.file_size}; refused (not a torch checkpoint)")
                with zf.open(info) as fh:
                    while fh.read(_CHUNK):
                        pass
    except CheckpointError:
        raise
    except Exception as exc:  # BadZipFile (bad CRC, torn header), EOFError, struct/zlib errors, ...
        raise CheckpointError(f"{path}: damaged: entry {short_repr(entry)} fails its check ({_first_line(exc)}); "
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


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: a garbage field may be a megabyte long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(value: Any, lo: int, hi: int) -> bool:
    """An int (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_finite(state_dict: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError naming the first floating tensor of ``state_dict`` holding NaN or inf."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{where}: tensor {short_repr(key)} holds {bad} NaN/inf value(s) of {value.numel()}; "
                                  f"these weights are unusable (a diverged run)")


def format_of(data: Any) -> str | None:
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else None


def check_header(data: Any, path: str, fmt: str, what: str) -> Dict[str, Any]:
    """The dict of one of our files, its format and version checked (a newer file is refused, not guessed)."""
    if not isinstance(data, dict) or format_of(data) != fmt:
        raise CheckpointError(f"{path}: not a {what} of this project (no format={fmt!r})")
    version = data.get("version")
    if not is_int(version, 1, 10**6):
        raise CheckpointError(f"{path}: field 'version' is {short_repr(version)}, not a format version (1..{VERSION})")
    if version > VERSION:
        raise CheckpointError(f"{path}: {what} format version {version} is newer than this code ({VERSION}); "
                              f"update the code to read it")
    return data


def tensor_field(value: Any, path: str, field: str) -> Dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state_dict, or CheckpointError naming the field and the first bad entry."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: field {field!r} is a {type(value).__name__}, not a state_dict (name -> tensor)")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {field} entry {short_repr(k)} is a {type(v).__name__}, not a tensor")
    return dict(value)


def require_field(data: Mapping[str, Any], key: str, path: str, what: str) -> Any:
    if key not in data:
        raise CheckpointError(f"{path}: no {key!r} field; a {what} needs it")
    return data[key]


def typed_field(data: Mapping[str, Any], key: str, path: str, types: tuple, want: str) -> None:
    """An optional field of the right type (bool is not a number here)."""
    if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
        raise CheckpointError(f"{path}: field {key!r} is a {type(data[key]).__name__}, not {want}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, for reports that say exactly what was evaluated."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
