"""The IJB-B / IJB-C release as insightface distributes it: where its files are, and what they say.

Layout (ROOT may be called anything; the target is read from the meta file names):

    ROOT/loose_crop/<img>.jpg
    ROOT/meta/<p>_face_tid_mid.txt         "img tid mid" per face
    ROOT/meta/<p>_name_5pts_score.txt      "img x1 y1 ... x5 y5 faceness" (loose-crop pixels)
    ROOT/meta/<p>_template_pair_label.txt  "tid1 tid2 label" (1 = same subject)
    ROOT/meta/<p>_1N_gallery_<G>.csv, <p>_1N_probe_mixed.csv   CSV, header row, tid, subject id, ...

Line i of the two face files describes the same face (blank lines are skipped, as the
reference's pandas reader does). Parsing is vectorised (numpy on the bytes, np.loadtxt's C
parser): the 15.6M-line IJB-C pair file takes about two seconds. Only when the fast parse
fails is the file scanned line by line, to name the first bad line:
``<file>:<line>: what is wrong (what was expected)``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils.errors import UserError
from utils.files import check_regular, read_regular

FORMAT_VERSION = "ijb-faces-v1"  # part of IJBFaces.key: bump when parsing changes what the arrays hold
META_MAX_BYTES = 4 << 30  # the IJB-C pair file is ~300 MB; a meta "file" beyond 4 GB is not one
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)  # what bytes.split() splits on


class IJBFormatError(UserError, ValueError):
    """A malformed or missing IJB meta file: one line, ``<file>:<line>: what is wrong (what was expected)``."""


@dataclass(frozen=True)
class IJBTarget:
    prefix: str  # of every meta file name: "ijbb_face_tid_mid.txt"
    galleries: tuple[str, ...]  # the 1:N gallery names, "<prefix>_1N_gallery_<name>.csv"


# target name -> its files' naming; a new IJB-like release is one entry here
TARGETS: dict[str, IJBTarget] = {
    "IJBB": IJBTarget("ijbb", ("S1", "S2")),
    "IJBC": IJBTarget("ijbc", ("G1", "G2")),
}


@dataclass
class IJBLayout:
    """Absolute paths of one release's files. pairs/probe None and galleries {} when absent:
    the caller decides whether its mode (1:1, 1:N) needs them."""
    target: str
    root: str
    image_dir: str
    faces: str  # <p>_name_5pts_score.txt
    media: str  # <p>_face_tid_mid.txt
    pairs: str | None
    galleries: dict[str, str]
    probe: str | None


def _existing(path: str) -> str | None:
    return path if os.path.isfile(path) else None


def find_ijb(path: str) -> IJBLayout:
    """The layout of the release at `path` (ROOT, or ROOT/meta itself).

    FileNotFoundError names a missing folder or face file; IJBFormatError when the meta folder
    holds the face files of two targets (which one was meant is not ours to guess).
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{path}: no such IJB folder (expected a folder holding meta/ and loose_crop/)")
    meta = os.path.join(root, "meta")
    if not os.path.isdir(meta):
        if glob.glob(os.path.join(root, "*_face_tid_mid.txt")):  # `path` is the meta folder itself
            meta, root = root, os.path.dirname(root)
        else:
            raise FileNotFoundError(f"{path}: no meta/ folder (expected meta/<ijbb|ijbc>_face_tid_mid.txt and "
                                    "loose_crop/, as in insightface's IJB evaluation package)")
    found = [name for name, t in TARGETS.items() if os.path.isfile(os.path.join(meta, f"{t.prefix}_face_tid_mid.txt"))
             or os.path.isfile(os.path.join(meta, f"{t.prefix}_name_5pts_score.txt"))]
    if len(found) > 1:
        raise IJBFormatError(f"{meta}: holds the face files of {' and '.join(found)}; keep one target per folder")
    if not found:
        expected = " or ".join(f"{t.prefix}_face_tid_mid.txt" for t in TARGETS.values())
        raise FileNotFoundError(f"{meta}: no IJB face file (expected {expected})")
    target = found[0]
    spec = TARGETS[target]
    p = os.path.join(meta, spec.prefix)
    for name in ("_face_tid_mid.txt", "_name_5pts_score.txt"):
        if not os.path.isfile(p + name):
            raise FileNotFoundError(f"{p + name}: missing (every {target} evaluation needs it)")
    image_dir = os.path.join(root, "loose_crop")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: missing (the {target} loose crops the 5 points refer to)")
    galleries = {g: p + f"_1N_gallery_{g}.csv" for g in spec.galleries if os.path.isfile(p + f"_1N_gallery_{g}.csv")}
    return IJBLayout(target=target, root=root, image_dir=image_dir, faces=p + "_name_5pts_score.txt",
                     media=p + "_face_tid_mid.txt", pairs=_existing(p + "_template_pair_label.txt"),
                     galleries=galleries, probe=_existing(p + "_1N_probe_mixed.csv"))


@dataclass
class IJBFaces:
    """Every face of the release, in 5pts-file order (the row order of every per-face array)."""
    names: np.ndarray  # (N,) str, relative to image_dir
    landmarks: np.ndarray  # (N, 5, 2) float32, loose-crop pixels (x, y), parsed as float then cast, as the reference
    faceness: np.ndarray  # (N,) float32, the detector score the reference weights features by
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    key: str  # sha256 hex of FORMAT_VERSION and both files' bytes: what the crop cache is keyed by


def _read(path: str) -> bytes:
    data = read_regular(path, "IJB meta file", META_MAX_BYTES)
    if not data.strip():
        raise IJBFormatError(f"{path}:1: empty file (expected one line per row)")
    return data


def _nonblank_lines(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per non-blank line, 1-based line number of each non-blank line), vectorised.

    Tokens are what bytes.split() makes (runs of non-whitespace); "\\r\\n" endings count as one line end.
    """
    a = np.frombuffer(data, np.uint8)
    ws = np.isin(a, _WHITESPACE)
    prev_ws = np.empty_like(ws)
    prev_ws[:1] = True
    prev_ws[1:] = ws[:-1]
    newlines = np.flatnonzero(a == 10)
    line_of_token = np.searchsorted(newlines, np.flatnonzero(~ws & prev_ws))
    counts = np.bincount(line_of_token, minlength=len(newlines) + 1)
    lines = np.flatnonzero(counts)
    return counts[lines], lines + 1


def _first_bad(data: bytes, path: str, check: Callable[[list[bytes]], str | None], skip: int = 0,
               sep: bytes | None = None) -> IJBFormatError:
    """Scan line by line (the slow path, after a fast parse failed) for the first line `check` rejects
    (its fields split on `sep`, default whitespace; the first `skip` non-blank lines are a header)."""
    seen = 0
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        seen += 1
        why = None if seen <= skip else check(line.strip().split(sep))
        if why:
            return IJBFormatError(f"{path}:{number}: {why}")
    return IJBFormatError(f"{path}: could not be parsed (no single bad line found)")


def _is_int(tok: bytes) -> bool:
    try:
        int(tok)
        return True
    except ValueError:
        return False


def _is_finite(tok: bytes) -> bool:
    try:
        return bool(np.isfinite(float(tok)))
    except ValueError:
        return False


def _token_table(data: bytes, path: str, ncols: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """((rows, ncols) bytes array, 1-based line of each row) of a whitespace-separated file."""
    counts, lines = _nonblank_lines(data)
    bad = np.flatnonzero(counts != ncols)
    if bad.size:
        i = int(bad[0])
        raise IJBFormatError(f"{path}:{int(lines[i])}: {int(counts[i])} fields (expected {ncols}: {what})")
    return np.array(data.split()).reshape(-1, ncols), lines


def _ints(col: np.ndarray, lines: np.ndarray, path: str, name: str) -> np.ndarray:
    try:
        return col.astype(np.int64)
    except (ValueError, OverflowError):
        i = next(k for k, tok in enumerate(col.tolist()) if not _is_int(tok))
        raise IJBFormatError(f"{path}:{int(lines[i])}: {name} {col[i].decode(errors='replace')!r} is not an "
                             "integer") from None


def _finite_floats(table: np.ndarray, lines: np.ndarray, path: str, name: str) -> np.ndarray:
    try:
        values = table.astype(np.float64)
    except ValueError:
        values = None
    bad = (np.array([[not _is_finite(t) for t in row] for row in table.tolist()]) if values is None
           else ~np.isfinite(values))
    if values is None or bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise IJBFormatError(f"{path}:{int(lines[i])}: {name} {table[i, j].decode(errors='replace')!r} is not a "
                             "finite number")
    return values


def _names(col: np.ndarray, lines: np.ndarray, path: str) -> np.ndarray:
    try:
        return np.char.decode(col, "utf-8")
    except UnicodeDecodeError:
        i = next(k for k, tok in enumerate(col.tolist()) if not _is_utf8(tok))
        raise IJBFormatError(f"{path}:{int(lines[i])}: image name is not UTF-8") from None


def _is_utf8(tok: bytes) -> bool:
    try:
        tok.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_faces(layout: IJBLayout) -> IJBFaces:
    """Both face files, checked row against row (same count, same image name on each row)."""
    pts_bytes, mid_bytes = _read(layout.faces), _read(layout.media)
    pts, pts_lines = _token_table(pts_bytes, layout.faces, 12, "image name, 10 landmark coordinates, faceness")
    mid, mid_lines = _token_table(mid_bytes, layout.media, 3, "image name, template id, media id")
    if len(pts) != len(mid):
        n = min(len(pts), len(mid))
        longer, lines = (layout.faces, pts_lines) if len(pts) > len(mid) else (layout.media, mid_lines)
        raise IJBFormatError(f"{longer}:{int(lines[n])}: {max(len(pts), len(mid))} faces, but "
                             f"{os.path.basename(layout.faces)} has {len(pts)} and {os.path.basename(layout.media)} "
                             f"{len(mid)} (expected line i of both files to describe the same face)")
    differ = np.flatnonzero(pts[:, 0] != mid[:, 0])
    if differ.size:
        i = int(differ[0])
        raise IJBFormatError(f"{layout.media}:{int(mid_lines[i])}: image {mid[i, 0].decode(errors='replace')!r}, but "
                             f"{layout.faces}:{int(pts_lines[i])} names {pts[i, 0].decode(errors='replace')!r} "
                             "(expected the same image on row i of both files)")
    numbers = _finite_floats(pts[:, 1:], pts_lines, layout.faces, "landmark/faceness value")
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for data in (pts_bytes, mid_bytes):
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return IJBFaces(names=_names(pts[:, 0], pts_lines, layout.faces),
                    landmarks=numbers[:, :10].astype(np.float32).reshape(-1, 5, 2),
                    faceness=numbers[:, 10].astype(np.float32),
                    templates=_ints(mid[:, 1], mid_lines, layout.media, "template id"),
                    medias=_ints(mid[:, 2], mid_lines, layout.media, "media id"),
                    key=digest.hexdigest())


def _loadtxt(data: bytes, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "input contained no data" and the like: a failure, not a warning
        return np.loadtxt(io.BytesIO(data), dtype=np.int64, comments=None, ndmin=2, **kwargs)


def _pair_check(fields: list[bytes]) -> str | None:
    if len(fields) != 3:
        return f"{len(fields)} fields (expected 3: template id, template id, label 0/1)"
    if not all(_is_int(f) for f in fields):
        return f"{b' '.join(fields).decode(errors='replace')!r} (expected three integers: tid1 tid2 label)"
    if int(fields[2]) not in (0, 1):
        return f"label {int(fields[2])} (expected 0 or 1)"
    return None


def read_pairs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, t2) int64 template ids and label int8 in {0, 1}, one per non-blank line, in file order."""
    data = _read(path)
    try:
        table = _loadtxt(data)
    except (ValueError, UserWarning):
        raise _first_bad(data, path, _pair_check) from None
    if table.shape[1] != 3 or not np.isin(table[:, 2], (0, 1)).all():
        raise _first_bad(data, path, _pair_check)
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].astype(np.int8)


def _csv_check(fields: list[bytes]) -> str | None:
    if len(fields) < 2:
        return f"{len(fields)} field (expected at least 2: template id, subject id)"
    bad = [f for f in fields[:2] if not _is_int(f.strip())]
    return f"{bad[0].decode(errors='replace')!r} is not an integer (expected template id, subject id)" if bad else None


def read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) int64 of a 1:N CSV (header row; columns 0 and 1), rows in file order.

    Templates repeat (one row per image); a template listed with two subjects is an error.
    """
    data = _read(path)
    header_end = data.find(b"\n", len(data) - len(data.lstrip()))
    body = data[header_end + 1:] if header_end >= 0 else b""
    try:
        table = _loadtxt(body, delimiter=",", usecols=(0, 1), quotechar='"')
    except (ValueError, UserWarning):
        if not body.strip():
            raise IJBFormatError(f"{path}:1: only a header row (expected template id, subject id rows)") from None
        raise _first_bad(data, path, _csv_check, skip=1, sep=b",") from None
    tids, sids = table[:, 0].copy(), table[:, 1].copy()
    order = np.argsort(tids, kind="stable")
    st, ss = tids[order], sids[order]
    first = np.searchsorted(st, st)  # index (in sorted order) of each template's first row
    conflict = np.flatnonzero(ss != ss[first])
    if conflict.size:
        rows = order[conflict]
        row = int(rows.min())  # the first offending row in file order
        k = int(conflict[np.argmin(rows)])
        other = int(order[first[k]])
        lines = _nonblank_lines(data)[1][1:]
        raise IJBFormatError(f"{path}:{int(lines[row])}: template {int(tids[row])} has subject {int(sids[row])}, "
                             f"but line {int(lines[other])} gives it subject {int(sids[other])} "
                             "(expected one subject per template)")
    return tids, sids


def check_known(known_templates: np.ndarray, ids: np.ndarray, path: str, first_line: int = 1,
                faces_file: str = "the face files") -> None:
    """Every id in `ids` is a template that has faces; else name the first offender (row i is line first_line + i)."""
    bad = np.flatnonzero(~np.isin(np.asarray(ids), np.asarray(known_templates)))
    if bad.size:
        i = int(bad[0])
        raise IJBFormatError(f"{path}:{first_line + i}: template {int(np.asarray(ids)[i])} has no face in "
                             f"{faces_file}")


def check_file(path: str) -> None:
    """A meta file exists and is a regular file (before minutes of work that end in reading it)."""
    check_regular(path, "IJB meta file", META_MAX_BYTES)
