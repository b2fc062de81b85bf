"""What is in a .rec pack, a verification .bin or a dataset folder, and what is wrong with it.

A report is a plain dict (JSON-ready). ``problems`` lists what is wrong, one line each
naming the file and record/item (truncated file, bad magic, undecodable image, label out
of range, broken identity records); ``notes`` lists what is merely worth knowing. The
quick check reads the index, the labels and a random sample of images; ``full=True``
reads and decodes every record without trusting the index or the header, so that every
bad record is named by key.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Dict, List

import numpy as np
from tqdm import tqdm

from data.bins import BinFormatError, load_bin
from data.facerec import FaceRec, header_range, read_property
from data.imageformat import image_format
from data.recordio import RecordIOError, RecordReader, read_idx, scan_offsets, unpack_irheader
from data.sources import DataSourceError, class_limit
from prepare.pack import decode_bgr
from utils.files import UnreadableFileError

MIN_PAIRS = 10  # the 10-fold protocol needs at least one pair per fold
MAX_PROBLEMS = 1000  # problems kept per file (the total is counted): a wrong property can flag every record
# pair counts of the published insightface files (FORMATS.md)
KNOWN_PAIRS = {"lfw": 6000, "agedb_30": 6000, "calfw": 6000, "cplfw": 6000, "cfp_ff": 7000, "cfp_fp": 7000,
               "vgg2_fp": 5000}


class _Report(dict):
    """A report dict with helpers to add capped problems and notes."""

    def problem(self, text: str) -> None:
        self["problem_count"] += 1
        if len(self["problems"]) < MAX_PROBLEMS:
            self["problems"].append(text)

    def note(self, text: str) -> None:
        self["notes"].append(text)


def _new_report(path: str, kind: str) -> _Report:
    return _Report(path=path, kind=kind, bytes=os.path.getsize(path), problems=[], problem_count=0, notes=[])


class _ImageTally:
    """Sizes ("HxW") and formats of checked images; undecodable ones become problems."""

    def __init__(self, report: _Report) -> None:
        self.report, self.sizes, self.formats, self.checked = report, Counter(), Counter(), 0

    def check(self, payload: bytes | np.ndarray, where: str) -> None:
        self.checked += 1
        if isinstance(payload, np.ndarray) and payload.ndim == 3:  # decoded pixels in a .bin
            self.formats["pixels"] += 1
            self.sizes[f"{payload.shape[0]}x{payload.shape[1]}"] += 1
            return
        data = payload.tobytes() if isinstance(payload, np.ndarray) else payload
        self.formats[image_format(data)] += 1
        img = decode_bgr(data)
        if img is None:
            self.report.problem(f"{where}: undecodable image ({len(data)} bytes, starts {data[:8]!r})")
        else:
            self.sizes[f"{img.shape[0]}x{img.shape[1]}"] += 1

    def store(self, total: int) -> None:
        self.report.update(checked=self.checked, of=total, sizes=dict(self.sizes.most_common()),
                           formats=dict(self.formats.most_common()))


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn without replacement (all when k >= n or k < 0)."""
    if k < 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _label_of(record_label) -> float:
    return float(np.atleast_1d(np.asarray(record_label, dtype=np.float64))[0])


class _Index:
    """key -> byte offset of a .idx (or of a scan), as arrays: a dict would cost ~100 bytes per record."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")  # duplicate keys: the last line wins, as in mxnet
        self.keys, self.offsets = keys[order], offsets[order]
        last = np.append(self.keys[1:] != self.keys[:-1], True) if len(keys) else np.empty(0, bool)
        self.keys, self.offsets = self.keys[last], self.offsets[last]

    def __len__(self) -> int:
        return len(self.keys)

    def offset(self, key: int) -> int | None:
        i = int(np.searchsorted(self.keys, key))
        return int(self.offsets[i]) if i < len(self.keys) and self.keys[i] == key else None


def _open_index(rec_path: str) -> _Index:
    idx_path = os.path.splitext(rec_path)[0] + ".idx"
    if os.path.exists(idx_path):
        return _Index(*read_idx(idx_path))
    offsets = scan_offsets(rec_path)
    return _Index(np.arange(len(offsets), dtype=np.int64), offsets)


def _scan_rec(rec_path: str, report: _Report, limit: int | None, progress: bool) -> np.ndarray | None:
    """Read and decode every record of a .rec; returns the class id per image (-1 unknown), or None.

    Does not trust the index (offsets past the end are reported per key) nor the header
    (identity records are checked against the image headers).
    """
    try:
        index = _open_index(rec_path)
    except RecordIOError as exc:
        report.problem(str(exc))
        return None
    raw = RecordReader(rec_path, indexed=False)  # read_at(offset) only, which checks every chunk
    read = _record_reader(rec_path, raw, report)
    ranges = _header_range(raw, index, report["bytes"])
    report["layout"] = "insightface" if ranges else "plain"
    report["records"] = len(index)
    _check_index(rec_path, report, index)
    if ranges and max(ranges) > len(index):
        report.problem(f"{rec_path} record 0: header range [{ranges[0]}, {ranges[1]}] runs past the {len(index)} "
                       f"records in the index (damaged header record?)")
        return None
    first_id, end = ranges if ranges else (0, 0)
    if ranges:
        image_keys = np.arange(1, first_id, dtype=np.int64)
        limit = limit if limit is not None else end - first_id
        other = int(np.count_nonzero(index.keys >= end))
        if other:
            report.note(f"{other} records with keys beyond the header's range 0..{end - 1} (ignored by readers)")
    else:
        image_keys = index.keys
    tally = _ImageTally(report)
    labels = np.full(len(image_keys), -1, dtype=np.int64)
    for i, key in enumerate(tqdm(image_keys.tolist(), desc=f"check {os.path.basename(rec_path)}", unit="rec",
                                 disable=not progress)):
        offset = index.offset(key)
        if offset is None:
            report.problem(f"{rec_path} record {key}: missing from the index (header says images are "
                           f"records 1..{first_id - 1})")
            continue
        got = read(key, offset)
        if got is None:
            continue
        header, payload = got
        labels[i] = _checked_label(f"{rec_path} record {key}", report, _label_of(header.label), len(index), limit)
        tally.check(payload, f"{rec_path} record {key}")
    tally.store(len(image_keys))
    if ranges:
        _check_identities(rec_path, report, read, index, first_id, end, labels)
    return labels


def _record_reader(rec_path: str, raw: RecordReader, report: _Report):
    """``read(key, offset)`` -> (IRHeader, payload), or None after reporting why the record is unreadable
    (an offset past the end of the file, a damaged chunk), the message naming the record's key."""
    size = report["bytes"]

    def read(key: int, offset: int):
        if offset >= size:
            report.problem(f"{rec_path} record {key} at byte {offset}: offset is past the end of the file "
                           f"({size} bytes; truncated?)")
            return None
        try:
            return unpack_irheader(raw.read_at(offset))
        except RecordIOError as exc:
            msg = str(exc)
            msg = msg.replace(f"{rec_path} record ", f"{rec_path} record {key} ", 1) if msg.startswith(rec_path) \
                else f"{rec_path} record {key}: {msg}"
            report.problem(msg)
            return None

    return read


def _header_range(raw: RecordReader, index: _Index, size: int) -> tuple[int, int] | None:
    """The insightface header's identity-record range [first, end), or None for a plain im2rec pack
    (also when record 0 is unreadable: it is then read, and reported, as an image)."""
    head_at = index.offset(0)
    try:
        return header_range(raw.read_at(head_at)) if head_at is not None and head_at < size else None
    except RecordIOError:
        return None


def _checked_label(where: str, report: _Report, value: float, records: int, limit: int | None) -> int:
    """The class id of a record's label, or -1 after reporting a label that is not one (negative,
    fractional, beyond what a pack of ``records`` records can hold); ``limit`` classes, when known,
    bound it too (a label past it is reported but kept)."""
    if not value.is_integer() or value < 0:
        report.problem(f"{where}: label {value} is not a class id")
        return -1
    if value >= class_limit(records):
        report.problem(f"{where}: label {value:.0f} is not believable in a pack of {records} records "
                       f"(damaged label?)")
        return -1
    if limit is not None and value >= limit:
        report.problem(f"{where}: label {int(value)} >= {limit} classes")
    return int(value)


def _check_index(rec_path: str, report: _Report, index: _Index) -> None:
    """An empty index, or distinct keys sharing one record (a damaged .idx line), are problems."""
    if not len(index):
        report.problem(f"{rec_path}: the index lists no records")
        return
    by_offset = np.argsort(index.offsets, kind="stable")
    same = np.flatnonzero(index.offsets[by_offset][1:] == index.offsets[by_offset][:-1])
    for j in same[:MAX_PROBLEMS].tolist():
        a, b = int(index.keys[by_offset[j]]), int(index.keys[by_offset[j + 1]])
        report.problem(f"{rec_path} record {b}: the index points it at byte {int(index.offsets[by_offset[j]])}, "
                       f"where record {a} is (damaged .idx line; that record would be counted twice)")


def _check_identities(rec_path: str, report: _Report, read: Callable, index: _Index, first_id: int, end: int,
                      labels: np.ndarray) -> None:
    """Identity records must tile images 1..first_id-1 in class order and agree with the image headers."""
    expect = 1
    for c, key in enumerate(range(first_id, end)):
        offset = index.offset(key)
        if offset is None:
            report.problem(f"{rec_path} record {key}: identity record of class {c} missing from the index")
            return
        got = read(key, offset)
        if got is None:
            return
        rng = np.atleast_1d(np.asarray(got[0].label, dtype=np.float64))
        lo, hi = (int(rng[0]), int(rng[1])) if rng.size >= 2 and np.all(np.isfinite(rng[:2])) \
            and np.all(rng[:2] == np.round(rng[:2])) else (-1, -1)
        if lo != expect or hi <= lo or hi > first_id:
            report.problem(f"{rec_path} record {key}: identity record of class {c} has range {rng[:2].tolist()}, "
                           f"expected [{expect}, end) with end <= {first_id}")
            return
        for k in np.flatnonzero(labels[lo - 1:hi - 1] >= 0):
            if labels[lo - 1 + k] != c:
                report.problem(f"{rec_path} record {lo + k}: image label {labels[lo - 1 + k]} but identity "
                               f"record {key} puts it in class {c}")
        expect = hi
    if expect != first_id:
        report.problem(f"{rec_path} record {end - 1}: identity records end at image {expect - 1}, "
                       f"images run to record {first_id - 1}")


def _quick_rec(rec_path: str, report: _Report, sample: int, seed: int, limit: int | None) -> np.ndarray | None:
    """Layout and labels through FaceRec, then a random sample of images decoded."""
    try:
        rec = FaceRec(rec_path)
    except (RecordIOError, UnreadableFileError) as exc:
        report.problem(str(exc))
        report.note("run with --full to list every bad record")
        return None
    report["layout"], report["records"] = rec.layout, len(rec.reader)
    tally = _ImageTally(report)
    for i in _sample(len(rec), sample, seed).tolist():
        key = int(rec.image_keys[i])
        try:
            payload, _ = rec.read(i)
        except RecordIOError as exc:
            report.problem(str(exc))
            continue
        tally.check(payload, f"{rec_path} record {key}")
    tally.store(len(rec))
    rec.reader.close()
    if limit is not None:
        for i in np.flatnonzero(rec.labels >= limit).tolist():
            report.problem(f"{rec_path} record {int(rec.image_keys[i])}: label {int(rec.labels[i])} "
                           f">= {limit} classes")
    return rec.labels


def inspect_rec(path: str, full: bool = False, sample: int = 200, seed: int = 0, progress: bool = False,
                plot: str | None = None) -> dict:
    """Report on a .rec pack: layout, counts, label range versus ``property``, image sizes/formats."""
    report = _new_report(path, "rec")
    prop_path = os.path.join(os.path.dirname(os.path.abspath(path)), "property")
    prop = None
    if os.path.exists(prop_path):
        try:
            prop = read_property(prop_path)
            report["property"] = {"classes": prop[0], "size": list(prop[1])}
        except (RecordIOError, UnreadableFileError) as exc:
            report.problem(str(exc))
    limit = prop[0] if prop else None
    labels = _scan_rec(path, report, limit, progress) if full else _quick_rec(path, report, sample, seed, limit)
    if labels is None:
        return dict(report)
    if limit is not None and limit > class_limit(report.get("records", 0)):
        report.problem(f"{prop_path}: num_classes {limit} is not believable for a pack of {report['records']} "
                       f"records (at most {class_limit(report['records'])})")
        limit = None
    good = labels[(labels >= 0) & (labels < class_limit(report.get("records", 0)))]
    report["images"] = len(labels)
    if not len(labels):
        report.problem(f"{path}: the pack holds no images")
    if len(good):
        counts = np.bincount(good, minlength=max(limit or 0, int(good.max()) + 1))
        report["label_range"] = [int(good.min()), int(good.max())]
        report["classes"] = len(counts)
        report["per_class"] = {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
        if (counts == 0).any():
            report.note(f"{int((counts == 0).sum())} of {len(counts)} classes have no images")
        if plot:
            plot_class_counts(counts, plot, os.path.basename(path))
            report["plot"] = plot
    if prop and report.get("sizes") and list(report["sizes"]) != [f"{prop[1][0]}x{prop[1][1]}"]:
        report.note(f"property says {prop[1][0]}x{prop[1][1]} but checked images are "
                    f"{', '.join(report['sizes'])}")
    return dict(report)


def _payload_kind(item) -> str:
    if isinstance(item, bytes):
        return "bytes"
    return "uint8 array (encoded)" if item.ndim == 1 else "uint8 array (HxWx3 pixels)"


def inspect_bin(path: str, full: bool = False, sample: int = 200, seed: int = 0, progress: bool = False,
                plot: str | None = None) -> dict:
    """Report on a verification .bin: pairs, same/different balance, payload kind, image sizes/formats."""
    report = _new_report(path, "bin")
    try:
        items, issame = load_bin(path)
    except (BinFormatError, UnreadableFileError, FileNotFoundError) as exc:
        report.problem(str(exc))
        return dict(report)
    same = int(issame.sum())
    if len(issame) < MIN_PAIRS:
        report.problem(f"{path}: {len(issame)} pairs; the 10-fold verification protocol needs at least {MIN_PAIRS}")
    elif same in (0, len(issame)):
        report.problem(f"{path}: all {len(issame)} pairs are {'same' if same else 'different'}-person pairs; "
                       "accuracy on it measures nothing (a damaged or wrongly made issame list?)")
    report.update(pairs=len(issame), same=same, different=len(issame) - same,
                  payload=dict(Counter(_payload_kind(x) for x in items).most_common()))
    name = os.path.splitext(os.path.basename(path))[0]
    if name in KNOWN_PAIRS and KNOWN_PAIRS[name] != len(issame):
        report.note(f"the published {name}.bin has {KNOWN_PAIRS[name]} pairs")
    if same != len(issame) - same:
        report.note(f"unbalanced: {same} same and {len(issame) - same} different pairs")
    tally = _ImageTally(report)
    picked = _sample(len(items), -1 if full else sample, seed).tolist()
    for i in tqdm(picked, desc=f"check {os.path.basename(path)}", unit="img", disable=not progress):
        tally.check(items[i], f"{path} item {i} (pair {i // 2})")
    tally.store(len(items))
    return dict(report)


# file suffix -> inspector; a folder is inspected as its train.rec and every .bin in it
INSPECTORS: Dict[str, Callable[..., dict]] = {".rec": inspect_rec, ".bin": inspect_bin}


def files_to_inspect(path: str) -> List[str]:
    """The files :func:`inspect_path` reports on: the file itself, or a folder's train.rec and .bin files."""
    if not os.path.exists(path):
        raise DataSourceError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n == "train.rec" or n.endswith(".bin")),
                       key=lambda n: (n != "train.rec", n))
        if not names:
            raise DataSourceError(f"{path}: no train.rec or .bin files to inspect")
        return [os.path.join(path, n) for n in names]
    if os.path.splitext(path)[1] not in INSPECTORS:
        raise DataSourceError(f"{path}: cannot inspect this (expected a .rec, a .bin or a dataset folder)")
    return [path]


def inspect_path(path: str, full: bool = False, sample: int = 200, seed: int = 0, progress: bool = False,
                 plot: str | None = None) -> List[dict]:
    """One report per file of ``path`` (see :func:`files_to_inspect`)."""
    return [INSPECTORS[os.path.splitext(f)[1]](f, full=full, sample=sample, seed=seed, progress=progress, plot=plot)
            for f in files_to_inspect(path)]


def plot_class_counts(counts: np.ndarray, path: str, title: str) -> None:
    """PNG histogram of images per class (how many classes have k images), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from utils.atomic import write_atomic

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lo, hi = int(counts.min()), int(counts.max())
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 50 else 50  # one bar per count while that stays readable
    ax.hist(counts, bins=bins, color="tab:blue", edgecolor="white")
    ax.set_xlabel("images per class")
    ax.set_ylabel("classes")
    ax.set_title(f"{title}: {len(counts)} classes, {int(counts.sum())} images")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _counts(c: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in c.items()) or "none"


def summary_lines(report: dict, show: int = 20) -> List[str]:
    """Human-readable lines for one report: what it holds, then its problems (the first ``show``)."""
    path = report["path"]
    if report["kind"] == "rec" and "layout" in report:
        head = f"{path}: {report['layout']} layout, {report.get('images', 0)} images"
        if "classes" in report:
            lo, hi = report["label_range"]
            head += f", {report['classes']} classes (labels {lo}..{hi})"
        head += f", {report['records']} records, {report['bytes']} bytes"
    elif report["kind"] == "bin" and "pairs" in report:
        head = (f"{path}: {report['pairs']} pairs ({report['same']} same, {report['different']} different), "
                f"items: {_counts(report['payload'])}")
    else:
        head = f"{path}: unreadable"
    lines = [head]
    if "property" in report:
        p = report["property"]
        lines.append(f"  property: {p['classes']} classes, {p['size'][0]}x{p['size'][1]}")
    if "per_class" in report:
        pc = report["per_class"]
        plot = f" (plot: {report['plot']})" if "plot" in report else ""
        lines.append(f"  images per class: min {pc['min']}, median {pc['median']:g}, max {pc['max']}{plot}")
    if "checked" in report:
        lines.append(f"  checked {report['checked']} of {report['of']} images: sizes {_counts(report['sizes'])}; "
                     f"formats {_counts(report['formats'])}")
    lines += [f"  note: {n}" for n in report["notes"]]
    lines += [f"  PROBLEM {p}" for p in report["problems"][:show]]
    if report["problem_count"] > show:
        lines.append(f"  ... and {report['problem_count'] - show} more problems (all: --json FILE)")
    return lines
