"""The IJB-B / IJB-C release as insightface distributes it: where its files are, and what they say.

Layout (ROOT may be called anything; the target is read from the meta file names):

    ROOT/loose_crop/<img>.jpg
    ROOT/meta/<p>_face_tid_mid.txt         "img tid mid" per face
    ROOT/meta/<p>_name_5pts_score.txt      "img x1 y1 ... x5 y5 faceness" (loose-crop pixels)
    ROOT/meta/<p>_template_pair_label.txt  "tid1 tid2 label" (1 = same subject)
    ROOT/meta/<p>_1N_gallery_<G>.csv, <p>_1N_probe_mixed.csv   CSV, header row, tid, subject id, ...

Line i of the two face files describes the same face (blank lines are skipped, as the
reference's pandas reader does). Read as the reference's text-mode readers read them: a leading
UTF-8 BOM is dropped and "\n", "\r\n" and a lone "\r" all end a line; extra trailing columns of
the tid/mid and pair files are ignored (the reference picks its columns by index); a 1:N CSV's
columns are found by their header names TEMPLATE_ID / SUBJECT_ID (any case) when it has them,
else they are columns 0 and 1 as in ``ijb_1n.py``. Meta file names match in any case
(IJBC_face_tid_mid.txt from a case-insensitive copy), and a folder holding a single release
folder (IJB_release/ with only IJBC/) is that release. Parsing is vectorised (numpy on the bytes, np.loadtxt's C
parser): the 15.6M-line IJB-C pair file takes about two seconds. Only when the fast parse
fails is the file scanned line by line, to name the first bad line:
``<file>:<line>: what is wrong (what was expected)``.
"""

from __future__ import annotations

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


_UTF8_BOM = b"\xef\xbb\xbf"


def _listing(folder: str) -> dict[str, str]:
    """lower-cased file name -> its name in `folder` (an exact-case name wins over another case)."""
    names = sorted(os.listdir(folder), key=lambda n: n != n.lower())
    out: dict[str, str] = {}
    for name in names:
        out.setdefault(name.lower(), name)
    return out


def _meta_path(meta: str, listing: dict[str, str], name: str) -> str | None:
    """The path of meta file `name` in any case, if it is a file."""
    found = listing.get(name.lower())
    path = os.path.join(meta, found) if found else None
    return path if path and os.path.isfile(path) else None


def _single_release(root: str, path: str) -> str | None:
    """The one sub-folder of `root` holding a meta/ folder (IJB_release/IJBC), or None when there is none;
    IJBFormatError when there are several (which one was meant is not ours to guess)."""
    subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "meta")))
    if len(subs) > 1:
        raise IJBFormatError(f"{path}: holds {len(subs)} IJB releases ({', '.join(subs)}); name one folder per "
                             f"release, e.g. {os.path.join(path, subs[0])}")
    return os.path.join(root, subs[0]) if subs else None


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
        if any(n.endswith(("_face_tid_mid.txt", "_name_5pts_score.txt")) for n in _listing(root)):
            meta, root = root, os.path.dirname(root)  # `path` is the meta folder itself
        elif (inner := _single_release(root, path)) is not None:
            return find_ijb(inner)
        else:
            raise FileNotFoundError(f"{path}: no meta/ folder (expected meta/<ijbb|ijbc>_face_tid_mid.txt and "
                                    "loose_crop/, as in insightface's IJB evaluation package)")
    listing = _listing(meta)
    found = [name for name, t in TARGETS.items() if _meta_path(meta, listing, f"{t.prefix}_face_tid_mid.txt")
             or _meta_path(meta, listing, f"{t.prefix}_name_5pts_score.txt")]
    if len(found) > 1:
        raise IJBFormatError(f"{meta}: holds the face files of {' and '.join(found)}; keep one target per folder")
    if not found:
        expected = " or ".join(f"{t.prefix}_face_tid_mid.txt" for t in TARGETS.values())
        raise FileNotFoundError(f"{meta}: no IJB face file (expected {expected})")
    target = found[0]
    spec = TARGETS[target]
    def meta_file(suffix: str) -> str | None:
        return _meta_path(meta, listing, spec.prefix + suffix)

    faces, media = meta_file("_name_5pts_score.txt"), meta_file("_face_tid_mid.txt")
    for name, got in (("_face_tid_mid.txt", media), ("_name_5pts_score.txt", faces)):
        if got is None:
            raise FileNotFoundError(f"{os.path.join(meta, spec.prefix + name)}: missing (every {target} "
                                    "evaluation needs it)")
    image_dir = os.path.join(root, "loose_crop")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: missing (the {target} loose crops the 5 points refer to)")
    galleries = {g: csv for g in spec.galleries if (csv := meta_file(f"_1N_gallery_{g}.csv"))}
    return IJBLayout(target=target, root=root, image_dir=image_dir, faces=faces, media=media,
                     pairs=meta_file("_template_pair_label.txt"), galleries=galleries,
                     probe=meta_file("_1N_probe_mixed.csv"))


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
    """The file's bytes as a text-mode reader sees them: no UTF-8 BOM, every line ending "\n"."""
    data = read_regular(path, "IJB meta file", META_MAX_BYTES)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise IJBFormatError(f"{path}:1: UTF-16 text (expected ASCII / UTF-8, as the release's files)")
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):  # a lone CR ends a line, as universal newlines
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
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


def _token_table(data: bytes, path: str, ncols: int, what: str, extra_ok: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """((rows, ncols) bytes array, 1-based line of each row) of a whitespace-separated file.

    ``extra_ok``: a line may hold more fields than ``ncols``; its first ``ncols`` are taken.
    """
    counts, lines = _nonblank_lines(data)
    bad = np.flatnonzero(counts < ncols if extra_ok else counts != ncols)
    if bad.size:
        i = int(bad[0])
        expected = f"at least {ncols}" if extra_ok else f"{ncols}"
        raise IJBFormatError(f"{path}:{int(lines[i])}: {int(counts[i])} fields (expected {expected}: {what})")
    tokens = np.array(data.split())
    if (counts == ncols).all():
        return tokens.reshape(-1, ncols), lines
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return tokens[starts[:, None] + np.arange(ncols)], lines


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
    mid, mid_lines = _token_table(mid_bytes, layout.media, 3, "image name, template id, media id", extra_ok=True)
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
    if len(fields) < 3:
        return f"{len(fields)} fields (expected at least 3: template id, template id, label 0/1)"
    fields = fields[:3]
    if not all(_is_int(f) for f in fields):
        return f"{b' '.join(fields).decode(errors='replace')!r} (expected three integers: tid1 tid2 label)"
    if int(fields[2]) not in (0, 1):
        return f"label {int(fields[2])} (expected 0 or 1)"
    return None


def read_pairs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, t2) int64 template ids and label int8 in {0, 1}, one per non-blank line, in file order
    (columns 0-2; any further columns are ignored, as the reference's column picks do)."""
    data = _read(path)
    try:
        table = _loadtxt(data, usecols=(0, 1, 2))
    except (ValueError, UserWarning):
        raise _first_bad(data, path, _pair_check) from None
    if table.shape[1] != 3 or not np.isin(table[:, 2], (0, 1)).all():
        raise _first_bad(data, path, _pair_check)
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].astype(np.int8)


def _csv_checker(cols: tuple[int, int]) -> Callable[[list[bytes]], str | None]:
    def check(fields: list[bytes]) -> str | None:
        if len(fields) <= max(cols):
            return (f"{len(fields)} field(s) (expected at least {max(cols) + 1}: template id in column {cols[0]}, "
                    f"subject id in column {cols[1]})")
        bad = [fields[c] for c in cols if not _is_int(fields[c].strip().strip(b'"'))]
        if bad:
            return f"{bad[0].decode(errors='replace')!r} is not an integer (expected template id, subject id)"
        return None
    return check


CSV_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID")  # NIST's header names of the two columns read


def _csv_columns(header: bytes) -> tuple[int, int]:
    """(template, subject) column indices: by header name (any case, quotes and spaces ignored) when the
    header names both, else (0, 1), the reference's fixed columns."""
    cells = [c.strip().strip('"').strip().upper() for c in header.decode("utf-8", "replace").split(",")]
    if all(name in cells for name in CSV_COLUMNS):
        return cells.index(CSV_COLUMNS[0]), cells.index(CSV_COLUMNS[1])
    return 0, 1


def read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) int64 of a 1:N CSV (header row; the TEMPLATE_ID and SUBJECT_ID
    columns, or columns 0 and 1 when the header does not name them), rows in file order.

    Templates repeat (one row per image); a template listed with two subjects is an error.
    """
    data = _read(path)
    header_start = len(data) - len(data.lstrip())
    header_end = data.find(b"\n", header_start)
    body = data[header_end + 1:] if header_end >= 0 else b""
    cols = _csv_columns(data[header_start:header_end if header_end >= 0 else len(data)])
    try:
        table = _loadtxt(body, delimiter=",", usecols=cols, quotechar='"')
    except (ValueError, UserWarning):
        if not body.strip():
            raise IJBFormatError(f"{path}:1: only a header row (expected template id, subject id rows)") from None
        raise _first_bad(data, path, _csv_checker(cols), skip=1, sep=b",") from None
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
