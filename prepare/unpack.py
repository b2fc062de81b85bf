"""Unpack RecordIO packs and verification .bin files into plain image folders.

Users coming from the seeds (InsightFace_Pytorch ``prepare_data.py --rec_path``,
insightface's ``mx_recordio_2_images.py``) want the images as files. We write each
payload's bytes as stored: no decode and no re-encode, so no JPEG generation loss and
no BGR/RGB swap (the famous bug of tools that decode with OpenCV and save the array as
RGB). The extension follows the payload's magic bytes. Re-encoding happens only when
asked (``reencode='png'|'jpg'``).

Layout written by :func:`unpack_rec`: ``OUT/<class>/<key>.<ext>``. Class folders and
file names are zero-padded to a fixed width per pack (digits of the largest class id
and key), so the name order that folder readers sort by (torchvision's ImageFolder,
our FolderSource) is the numeric order: class folder ``i`` gets label ``i`` again.

Every file is written under a temp name and renamed, so a file that exists is complete
and a run that was stopped can be started again: present files are skipped. Which pack
a folder holds is recorded in ``OUT/.unpack.json`` (written before the first image): a
resume of the same pack skips what is there, another pack is refused instead of being
mixed in (its images would be "already present" under the same names). No symlink in OUT
is followed: one where a class folder or image goes is refused by name.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from data.bins import BinFormatError, decode_bin, load_bin
from data.facerec import FaceRec
from data.imageformat import KNOWN_EXTENSIONS, oversize, payload_extension
from data.recordio import RecordIOError, RecordReader, unpack_irheader
from data.sources import DataSourceError
from utils.atomic import write_atomic, write_bytes, write_json

# --format choices: name -> (extension, OpenCV imencode params for a JPEG quality)
_ENCODERS: dict[str, tuple[str, Callable[[int], list[int]]]] = {
    "png": (".png", lambda quality: [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    "jpg": (".jpg", lambda quality: [cv2.IMWRITE_JPEG_QUALITY, int(quality)]),
}
REENCODE_FORMATS = tuple(_ENCODERS)
_CHUNK = 512  # images per task handed to a worker (bounds progress-bar latency)
MANIFEST = ".unpack.json"  # in OUT: which pack was unpacked there (see unpack_rec)
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # .rec bytes hashed into the fingerprint: 16 evenly spaced 4 KB reads


class UnpackError(DataSourceError):
    """An output folder that cannot take this unpack (another pack's images, a symlink out of it)."""


def fingerprint(reader: RecordReader) -> str:
    """sha256 of a pack's index (keys, offsets), its .rec size and 16 evenly spaced 4 KB samples of it.

    Cheap at any size (64 KB read), and two different packs share it only if they have the same
    record layout and the same bytes at every sampled place. A copied or moved pack keeps it.
    """
    h = hashlib.sha256()
    size = os.path.getsize(reader.rec_path)
    h.update(f"{size}:{len(reader.keys)}:".encode())
    h.update(np.ascontiguousarray(reader.keys, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(reader.offsets, dtype="<i8").tobytes())
    with open(reader.rec_path, "rb") as fh:
        for pos in np.linspace(0, max(size - _SAMPLE_BYTES, 0), _SAMPLES).astype(np.int64).tolist():
            fh.seek(pos)
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _claim(out_dir: str, manifest: dict, present: int) -> None:
    """Refuse ``out_dir`` when it holds another pack's unpack; else record ``manifest`` there (atomically)."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.lexists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
            old_src, old_fp, old_fmt = str(old["source"]), old["fingerprint"], old.get("format")
        except (OSError, ValueError, KeyError, TypeError):
            raise UnpackError(f"{path}: unreadable record of an earlier unpack; delete it (and {out_dir}'s images "
                              f"if they are not from {manifest['source']}) or choose another OUT") from None
        if old_fp != manifest["fingerprint"]:
            raise UnpackError(f"{out_dir}: holds the unpack of {old_src}, a different pack from {manifest['source']}; "
                              "choose another OUT (or delete this one) instead of mixing the two")
        if old_fmt != manifest["format"]:
            raise UnpackError(f"{out_dir}: was unpacked with --format {old_fmt or '(stored bytes)'}; resume with "
                              f"the same --format, or choose another OUT")
    elif present:
        raise UnpackError(f"{out_dir}: already holds {present} images named like this pack's, with no record of "
                          f"which pack they came from ({MANIFEST}); choose another OUT (or delete them)")
    write_json(path, manifest)


def _refuse_links(out_dir: str) -> None:
    """No symlink where a class folder or an image of ours goes: following one would write outside OUT."""
    if not os.path.isdir(out_dir):
        return
    with os.scandir(out_dir) as entries:
        for c in entries:
            if not c.name.isdigit():
                continue
            if c.is_symlink():
                raise UnpackError(f"{c.path}: is a symlink (to {os.path.realpath(c.path)}); unpack writes only "
                                  f"inside OUT: remove it or choose another OUT")
            if c.is_dir(follow_symlinks=False):
                with os.scandir(c.path) as files:
                    for f in files:
                        if f.is_symlink():
                            raise UnpackError(f"{f.path}: is a symlink; unpack never writes through one: remove "
                                              "it or choose another OUT")


def _digits(largest: int) -> int:
    """Zero-padding width that keeps name order equal to numeric order for 0..largest."""
    return len(str(max(int(largest), 0)))


def reencode_image(payload: bytes, fmt: str, jpeg_quality: int = 95) -> bytes | None:
    """Decode ``payload`` and encode it as ``fmt`` ('png' or 'jpg'); None if it does not decode.

    OpenCV decodes to the file's colours in BGR order and encodes BGR back, so the new file
    shows the same colours as the old one (red stays red). Output is 3-channel, 8-bit.
    """
    ext, params = _ENCODERS[fmt]
    if not len(payload) or oversize(payload):  # never hand a decoder a 10^10-pixel claim (cv2.error)
        return None
    try:
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None:
        return None
    ok, buf = cv2.imencode(ext, img, params(jpeg_quality))
    if not ok:  # pragma: no cover (OpenCV encodes any 8-bit BGR image to PNG/JPEG)
        raise RuntimeError(f"OpenCV could not encode a {img.shape} image as {ext}")
    return buf.tobytes()


def resolve_rec(path: str | os.PathLike) -> str:
    """The .rec file meant by ``path``: the file itself, or ``path/train.rec`` for a folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        if not os.path.isfile(rec):
            raise FileNotFoundError(f"{path}: no train.rec in this folder (expected {rec} + train.idx)")
        return rec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .rec file or dataset folder")
    return path


def _present(out_dir: str, keys: np.ndarray, labels: np.ndarray, class_w: int, key_w: int,
             suffix: str | None) -> np.ndarray:
    """Mask over images: True where ``out_dir/<class>/<key><ext>`` exists, non-empty, in the right folder.

    ``suffix``: the only extension that counts (re-encoding), or None for any image extension.
    One directory scan instead of a stat per image; keys are kept as int64 (8 bytes each).
    """
    done = np.zeros(len(keys), dtype=bool)
    if not os.path.isdir(out_dir) or not len(keys):
        return done
    found_keys: list[int] = []
    found_labels: list[int] = []
    with os.scandir(out_dir) as classes:
        for c in classes:
            if not (c.name.isdigit() and c.is_dir()) or c.name != f"{int(c.name):0{class_w}d}":
                continue
            label = int(c.name)
            with os.scandir(c.path) as files:
                for f in files:
                    stem, ext = os.path.splitext(f.name)
                    if not stem.isdigit() or stem != f"{int(stem):0{key_w}d}":
                        continue
                    if (ext == suffix if suffix else ext in KNOWN_EXTENSIONS) and f.stat().st_size > 0:
                        found_keys.append(int(stem))
                        found_labels.append(label)
    if not found_keys:
        return done
    fk = np.asarray(found_keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys[order], fk), 0, len(keys) - 1)
    idx = order[pos]
    hit = (keys[idx] == fk) & (labels[idx] == np.asarray(found_labels, dtype=np.int64))
    done[idx[hit]] = True
    return done


class _RecUnpacker:
    """Writes one chunk of images; each call opens its own reader (safe in worker threads)."""

    def __init__(self, reader: RecordReader, out_dir: str, class_w: int, key_w: int,
                 reencode: str | None, jpeg_quality: int):
        self.reader = reader
        self.out_dir = out_dir
        self.class_w = class_w
        self.key_w = key_w
        self.reencode = reencode
        self.jpeg_quality = jpeg_quality

    def __call__(self, keys: np.ndarray, labels: np.ndarray) -> tuple[int, int, Counter]:
        """(files written, bytes written, Counter of extensions) for these images."""
        nbytes = 0
        formats: Counter = Counter()
        reader = copy.copy(self.reader)  # its own file handle; index arrays are shared, not copied
        try:
            for key, label in zip(keys.tolist(), labels.tolist()):
                where = f"{reader.rec_path} record {key}"
                try:
                    _, payload = unpack_irheader(reader.read(key))
                except RecordIOError as exc:
                    if str(exc).startswith(reader.rec_path):
                        raise
                    raise RecordIOError(f"{where}: {exc}") from None
                if self.reencode:
                    data = reencode_image(payload, self.reencode, self.jpeg_quality)
                    if data is None:
                        raise RecordIOError(f"{where}: payload ({len(payload)} bytes, starting {payload[:8]!r}) is "
                                            f"not a decodable image; drop --format to write the raw bytes")
                    ext = _ENCODERS[self.reencode][0]
                else:
                    data, ext = payload, payload_extension(payload)
                name = f"{label:0{self.class_w}d}/{key:0{self.key_w}d}{ext}"
                write_bytes(os.path.join(self.out_dir, name), data)
                nbytes += len(data)
                formats[ext] += 1
        finally:
            reader.close()
        return len(keys), nbytes, formats


def unpack_rec(
    rec_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    workers: int = 1,
    reencode: str | None = None,
    progress: bool = True,
    jpeg_quality: int = 95,
) -> dict:
    """Write every image of a .rec pack as ``out_dir/<class>/<key>.<ext>``; skip files already there.

    ``rec_path``: a .rec (its .idx beside it, or none: then the .rec is scanned) or a folder
    holding train.rec. Both layouts (insightface header + identity records, which are not
    images; plain im2rec) and scalar or array labels (class = first value) are handled by
    :class:`data.facerec.FaceRec`. ``workers`` threads: the work is pread/write/rename and
    OpenCV calls, which release the GIL, and threads share the index instead of copying it.
    ``reencode`` 'png'/'jpg' decodes and re-encodes (``jpeg_quality`` 0-100 for 'jpg').

    Returns {'images' (in the pack, = written + skipped), 'written', 'skipped' (already
    present), 'classes', 'bytes' (written this run), 'formats' ({ext: count}), 'layout',
    'seconds', 'out'}.
    """
    t0 = time.perf_counter()
    if reencode is not None and reencode not in _ENCODERS:
        raise ValueError(f"reencode must be one of {', '.join(_ENCODERS)} or None, got {reencode!r}")
    rec = FaceRec(resolve_rec(rec_path), progress=progress)
    out_dir = os.fspath(out_dir)
    keys = np.asarray(rec.image_keys, dtype=np.int64)
    labels = np.asarray(rec.labels, dtype=np.int64)
    class_w = _digits(max(rec.num_classes - 1, int(labels.max()) if len(labels) else 0))
    key_w = _digits(int(keys.max()) if len(keys) else 0)
    suffix = _ENCODERS[reencode][0] if reencode else None
    _refuse_links(out_dir)
    done = _present(out_dir, keys, labels, class_w, key_w, suffix)
    os.makedirs(out_dir, exist_ok=True)
    _claim(out_dir, {"source": os.path.realpath(rec.rec_path), "rec_bytes": os.path.getsize(rec.rec_path),
                     "records": len(rec.reader), "images": len(keys), "format": reencode,
                     "fingerprint": fingerprint(rec.reader)}, int(done.sum()))
    todo = np.flatnonzero(~done)
    _make_class_folders(out_dir, np.unique(labels[todo]).tolist(), class_w)
    job = _RecUnpacker(rec.reader, out_dir, class_w, key_w, reencode, jpeg_quality)
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"unpack {os.path.basename(rec.rec_path)}",
               unit="img", disable=not progress, dynamic_ncols=True)
    try:
        written, nbytes, formats = _run_chunks(job, keys, labels, todo, max(1, int(workers)), bar)
    finally:
        bar.close()
    return {"images": len(keys), "written": written, "skipped": len(keys) - len(todo),
            "classes": len(np.unique(labels)), "bytes": nbytes, "formats": dict(sorted(formats.items())),
            "layout": rec.layout, "seconds": time.perf_counter() - t0, "out": out_dir}


def _make_class_folders(out_dir: str, classes: list[int], class_w: int) -> None:
    """Create ``out_dir/<class>`` for each class still to write; one that resolves elsewhere is refused."""
    real_out = os.path.realpath(out_dir)
    for c in classes:
        folder = os.path.join(out_dir, f"{c:0{class_w}d}")
        os.makedirs(folder, exist_ok=True)
        if os.path.realpath(folder) != os.path.join(real_out, f"{c:0{class_w}d}"):  # a link made meanwhile
            raise UnpackError(f"{folder}: resolves to {os.path.realpath(folder)}, outside {out_dir}; refused")


def _run_chunks(job: _RecUnpacker, keys: np.ndarray, labels: np.ndarray, todo: np.ndarray, workers: int,
                bar: tqdm) -> tuple[int, int, Counter]:
    """Write the images at positions ``todo`` in chunks (about 4 per worker thread, at most _CHUNK each).

    Returns (files written, bytes written, Counter of extensions). The first error stops the rest.
    """
    size = max(1, min(_CHUNK, -(-len(todo) // (workers * 4))))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    written = nbytes = 0
    formats: Counter = Counter()

    def add(result: tuple[int, int, Counter]) -> None:
        nonlocal written, nbytes
        n, b, f = result
        written, nbytes = written + n, nbytes + b
        formats.update(f)
        bar.update(n)

    if workers == 1:
        for c in chunks:
            add(job(keys[c], labels[c]))
        return written, nbytes, formats
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job, keys[c], labels[c]) for c in chunks]
        try:
            for fut in as_completed(futures):
                add(fut.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return written, nbytes, formats


def _bin_item_bytes(item: bytes | np.ndarray) -> bytes:
    """File bytes for one .bin item: encoded bytes as they are; (H, W, 3) RGB pixels as lossless PNG."""
    if isinstance(item, np.ndarray) and item.ndim == 3:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(item), cv2.COLOR_RGB2BGR))
        if not ok:  # pragma: no cover
            raise RuntimeError(f"OpenCV could not encode a {item.shape} array as PNG")
        return buf.tobytes()
    return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)


def _save_npy(path: str, array: np.ndarray) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a handle: np.save would append .npy to the temp name
            np.save(fh, array)

    write_atomic(path, _write)


def unpack_bin(bin_path: str | os.PathLike, out_dir: str | os.PathLike, npy: bool = False,
               progress: bool = True) -> dict:
    """Write the 2N images of a verification .bin as ``out_dir/<i>.<ext>`` and ``out_dir/pairs.txt``.

    Items that are encoded bytes (Python 2 str, bytes, 1-D uint8 arrays) are written as they
    are; (H, W, 3) uint8 RGB arrays as PNG (lossless). Names are zero-padded to the digits of
    2N-1. ``pairs.txt`` has one line per pair, ``<file_a> <file_b> <1|0>``, paths relative to
    ``out_dir`` (what :func:`prepare.pairs.make_bin` reads back). ``npy``: also ``images.npy``
    ((2N, 112, 112, 3) uint8 RGB, resized with INTER_AREA if needed) and ``issame.npy``.
    Returns {'images', 'pairs', 'same', 'bytes', 'formats', 'seconds', 'out'}.
    """
    from prepare.pairs import write_pairs  # pairs.py imports this module

    t0 = time.perf_counter()
    bin_path, out_dir = os.fspath(bin_path), os.fspath(out_dir)
    items, issame = load_bin(bin_path)
    os.makedirs(out_dir, exist_ok=True)
    width = _digits(len(items) - 1)
    names: list[str] = []
    nbytes = 0
    formats: Counter = Counter()
    for i, item in enumerate(tqdm(items, desc=f"unpack {os.path.basename(bin_path)}", unit="img",
                                  disable=not progress, dynamic_ncols=True)):
        data = _bin_item_bytes(item)
        ext = payload_extension(data)
        names.append(f"{i:0{width}d}{ext}")
        write_bytes(os.path.join(out_dir, names[-1]), data)
        nbytes += len(data)
        formats[ext] += 1
    write_pairs(os.path.join(out_dir, "pairs.txt"),
                [(names[2 * i], names[2 * i + 1], bool(s)) for i, s in enumerate(issame.tolist())])
    if npy:
        images, flags = decode_bin(bin_path, progress=progress)
        _save_npy(os.path.join(out_dir, "images.npy"), images)
        _save_npy(os.path.join(out_dir, "issame.npy"), flags)
    return {"images": len(items), "pairs": len(issame), "same": int(issame.sum()), "bytes": nbytes,
            "formats": dict(sorted(formats.items())), "seconds": time.perf_counter() - t0, "out": out_dir}


def find_bins(dataset_dir: str) -> list[str]:
    """The verification .bin files directly in ``dataset_dir``, sorted by name."""
    return sorted(p for p in glob.glob(os.path.join(glob.escape(dataset_dir), "*.bin")) if os.path.isfile(p))


def unpack_dataset(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, workers: int = 1,
                   reencode: str | None = None, npy: bool = False, progress: bool = True,
                   jpeg_quality: int = 95, bins: Sequence[str] | None = None) -> dict:
    """A whole insightface dataset folder: train.rec -> ``out/train/<class>/...``, each X.bin -> ``out/X/``.

    Either part may be absent, not both. Returns {'train': unpack_rec summary or None,
    'bins': {name: unpack_bin summary}, 'seconds'}.
    """
    t0 = time.perf_counter()
    dataset_dir, out_dir = os.fspath(dataset_dir), os.fspath(out_dir)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"{dataset_dir}: no such dataset folder (expected train.rec and/or .bin files in it)")
    rec = os.path.join(dataset_dir, "train.rec")
    bins = find_bins(dataset_dir) if bins is None else list(bins)
    if not os.path.isfile(rec) and not bins:
        raise FileNotFoundError(f"{dataset_dir}: neither train.rec nor any .bin file in this folder")
    for b in bins:
        if os.path.splitext(os.path.basename(b))[0] == "train":
            raise BinFormatError(f"{b}: a .bin named 'train' would unpack into {os.path.join(out_dir, 'train')}, "
                                 "where the training images go; rename it")
    train = None
    if os.path.isfile(rec):
        train = unpack_rec(rec, os.path.join(out_dir, "train"), workers=workers, reencode=reencode,
                           progress=progress, jpeg_quality=jpeg_quality)
    sets = {}
    for b in bins:
        name = os.path.splitext(os.path.basename(b))[0]
        sets[name] = unpack_bin(b, os.path.join(out_dir, name), npy=npy, progress=progress)
    return {"train": train, "bins": sets, "seconds": time.perf_counter() - t0}
