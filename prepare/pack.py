"""Pack an image folder, an im2rec ``.lst`` (or a .rec) into insightface's RecordIO layout.

Layout written (shared/reference/FORMATS.md) by :func:`data.facerec.write_pack`: header
record 0 ``[N+1, N+1+C]``, images at keys 1..N grouped by class, identity records
N+1..N+C holding each class's ``[first, end)`` key range, ``train.idx``, ``property``
(``C,H,W``); plus ``classes.txt`` (``label<TAB>name``: the class folder, or the source label).

Decisions where the format is silent:

- Classes are numbered like the training sources do (FolderSource: sorted folder names;
  a .lst: its labels), so a folder trained directly and packed gives the same labels. A
  class left without a usable image cannot be written (identity ranges must be non-empty):
  it is dropped, later classes move down by one, and classes.txt records the mapping.
- JPEG inputs are stored byte for byte. Other formats (PNG, BMP, WEBP, TIFF) are encoded as
  JPEG at ``quality``; ``keep_png`` stores PNG inputs unchanged (lossless; every reader
  decodes PNG). Format is told by the file's magic bytes, not its name.
- Every image must decode with OpenCV and be ``size`` (H, W) pixels; another size is a
  skipped input unless ``resize``, which resizes (INTER_AREA) and re-encodes it.
- ``detect`` (raw photos): each image's face is found (detection/, MTCNN), aligned to the
  ``size`` template and stored as JPEG at ``quality``; an image with no face is skipped.
- ``shuffle``: keys stay contiguous per class (so the identity records stay true), but the
  image records are written to the .rec in a random byte order, header first and identity
  records last; the .idx maps each key to wherever its record landed. Random-access readers
  (FaceRec, arcface_torch's MXFaceDataset) see the same dataset; a sequential reader of the
  .rec sees the classes mixed.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from data.imageformat import image_format, oversize
from data.sources import SOURCES, DataSourceError, FaceSource, check_labels, open_source, printable
from utils.atomic import write_text

_SHOW = 20  # problems listed on the terminal; all of them go to skipped.txt


class PackError(DataSourceError):
    """Input that cannot be packed at all (no images, bad options); one line naming it."""


def decode_bgr(payload: bytes) -> np.ndarray | None:
    """OpenCV decode to (H, W, 3) uint8 BGR, or None when the bytes are not a decodable image
    (or claim in their header more pixels than any face image has: never handed to the decoder)."""
    buf = np.frombuffer(payload, dtype=np.uint8)
    if buf.size == 0 or oversize(buf):
        return None
    try:
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def parse_size(text: str) -> Tuple[int, int]:
    """'112x112' or '112' -> (height, width) in pixels."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise PackError(f"--size {text!r}: expected HxW in pixels, e.g. 112x112") from None
    if len(parts) > 2 or h <= 0 or w <= 0:
        raise PackError(f"--size {text!r}: expected HxW in positive pixels, e.g. 112x112")
    return h, w


@dataclass(frozen=True)
class ImageRules:
    """What an input image must be, and how a non-JPEG one is stored."""

    size: Tuple[int, int] = (112, 112)  # (height, width) pixels
    resize: bool = False
    quality: int = 95  # JPEG quality 0-100 for images that are encoded
    keep_png: bool = False
    detect: object = None  # a prepare.align.DetectRules: find the face, align it to `size` (raw photos)


class Skip(Exception):
    """An input image that is left out of the pack; the message says why."""


def _encode(img: np.ndarray, ext: str, quality: int) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:  # pragma: no cover (OpenCV encodes any 3-channel uint8 image)
        raise Skip(f"OpenCV could not encode it as {ext}")
    return buf.tobytes()


def prepare_payload(data: bytes, rules: ImageRules) -> bytes:
    """The bytes to store for one input image, or :class:`Skip` saying why it cannot be used."""
    fmt = image_format(data)
    img = decode_bgr(data)
    if img is None:
        raise Skip(f"not a decodable image ({len(data)} bytes, format {fmt}, starts {bytes(data[:8])!r})")
    h, w = rules.size
    if rules.detect is not None:
        from prepare.align import detect_and_align

        found = detect_and_align(img, rules.detect, rules.size)
        if not found:
            raise Skip(f"no face found (min face {rules.detect.min_face:g} px, min score {rules.detect.min_score:g})")
        return _encode(found[0][0], ".jpg", rules.quality)
    ext = ".png" if fmt == "png" and rules.keep_png else ".jpg"
    if img.shape[:2] != (h, w):
        if not rules.resize:
            raise Skip(f"image is {img.shape[0]}x{img.shape[1]} (HxW), expected {h}x{w} "
                       "(pass --size HxW, or --resize to resize)")
        return _encode(cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA), ext, rules.quality)
    if fmt == "jpeg" or (fmt == "png" and rules.keep_png):
        return bytes(data)
    return _encode(img, ext, rules.quality)


# per-process state of the reading workers (set once by the pool initializer, never at import)
_WORKER: dict = {}


def _init_worker(source: FaceSource, rules: ImageRules) -> None:
    cv2.setNumThreads(1)
    _WORKER.update(source=source, rules=rules)


def _load(i: int) -> Tuple[int, bytes | None, str]:
    """(index, payload or None, reason) for image ``i`` of the worker's source."""
    source = _WORKER["source"]
    try:
        return i, prepare_payload(source.read(i), _WORKER["rules"]), ""
    except Skip as exc:
        return i, None, str(exc)
    except (OSError, ValueError) as exc:  # unreadable file, damaged record
        return i, None, (str(exc).splitlines() or [type(exc).__name__])[0]


def _loaded(source: FaceSource, order: np.ndarray, rules: ImageRules, workers: int) -> Iterator[tuple]:
    """:func:`_load` over ``order``, in that order; in ``workers`` processes when > 1."""
    if workers <= 1:
        _WORKER.update(source=source, rules=rules)
        yield from map(_load, order.tolist())
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (source, rules)) as pool:
        yield from pool.imap(_load, order.tolist(), chunksize=64)


def open_input(src: str, root: str | None = None) -> FaceSource:
    """The images to pack: any training source (folder, .lst, .rec); ``root`` for a .lst only."""
    if root is None:
        return open_source(src)
    if not src.endswith(".lst"):
        raise PackError(f"{src}: --root applies to an im2rec .lst input only")
    source = SOURCES.build("lst", src, root=root)
    check_labels(source)
    return source


@dataclass
class PackResult:
    """What :func:`pack` wrote and what it left out (``problems``: one line each, naming the input)."""

    out: str
    images: int = 0
    classes: int = 0
    bytes: int = 0
    skipped: int = 0
    dropped_classes: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0


def shuffle_records(src_rec: str, dst_rec: str, seed: int) -> None:
    """Copy an insightface pack's records byte for byte, image records in a random file order.

    Header record 0 first, then images 1..N permuted, then the identity records; keys and
    record bytes are unchanged, so only the .idx offsets differ from the source pack.
    """
    from data.facerec import FaceRec
    from data.recordio import RecordWriter

    rec = FaceRec(src_rec)
    reader = rec.reader
    first_id = len(rec.image_keys) + 1  # write_pack's images are keys 1..N
    end = first_id + rec.num_classes
    order = np.random.default_rng(seed).permutation(rec.image_keys)
    with RecordWriter(dst_rec) as writer:
        for key in [0, *order.tolist(), *range(first_id, end)]:
            writer.write(key, reader.read(key))
    reader.close()


def pack(src: str, out: str, rules: ImageRules = ImageRules(), root: str | None = None, shuffle: bool = False,
         seed: int = 0, workers: int = 1, progress: bool = True) -> PackResult:
    """Pack ``src`` into ``out`` (train.rec, train.idx, property, classes.txt; skipped.txt when
    inputs were left out). Unusable inputs are skipped and listed in the result, not raised."""
    from data.facerec import write_pack

    t0 = time.perf_counter()
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if os.path.isdir(real_src) and (real_out + os.sep).startswith(real_src + os.sep):
        raise PackError(f"{out}: output folder is inside the input {src}; choose an output folder outside it")
    source = open_input(src, root)
    # class folder names as written to classes.txt / printed: undecodable bytes as \xNN
    names = [printable(n) for n in getattr(source, "classes", None) or [str(c) for c in range(source.num_classes)]]
    order = np.argsort(source.labels, kind="stable")  # class order; file order kept within a class
    result = PackResult(out)
    kept: List[int] = []  # source class of each pack class

    def samples() -> Iterator[Tuple[int, bytes]]:
        bar = tqdm(total=len(order), desc=f"pack {os.path.basename(os.path.normpath(src))}", unit="img",
                   disable=not progress)
        for i, payload, reason in _loaded(source, order, rules, workers):
            bar.update()
            if payload is None:
                result.skipped += 1
                where = source.describe(i)
                file_name = where.split(" (", 1)[0]  # the reason may already start with the file's path
                reason = reason[len(file_name) + 2:] if reason.startswith(file_name + ": ") else reason
                result.problems.append(printable(f"{where}: {reason}"))  # file names may not be UTF-8
                continue
            label = int(source.labels[i])
            if not kept or kept[-1] != label:
                kept.append(label)
            yield len(kept) - 1, payload
        bar.close()

    shuffled_dir = os.path.join(out, ".shuffle.tmp")
    target = shuffled_dir if shuffle else out
    try:
        try:
            written = write_pack(target, samples(), image_size=rules.size)
        except ValueError as exc:
            if kept:
                raise
            raise PackError(f"{src}: no usable images ({result.skipped} skipped; first: "
                            f"{result.problems[0] if result.problems else 'none'})") from exc
        if shuffle:
            shuffle_records(written["rec"], os.path.join(out, "train.rec"), seed)
            os.replace(written["property"], os.path.join(out, "property"))
    finally:
        shutil.rmtree(shuffled_dir, ignore_errors=True)
    result.images, result.classes, result.bytes = written["images"], written["classes"], written["bytes"]
    present = set(kept)
    result.dropped_classes = [names[c] if c < len(names) else str(c)
                              for c in range(source.num_classes) if c not in present]
    write_text(os.path.join(out, "classes.txt"),
               "".join(f"{new}\t{names[c] if c < len(names) else c}\n" for new, c in enumerate(kept)))
    skipped_txt = os.path.join(out, "skipped.txt")
    if result.problems:
        write_text(skipped_txt, "".join(p + "\n" for p in result.problems))
    elif os.path.exists(skipped_txt):
        os.remove(skipped_txt)  # a stale list from an earlier run would mislead
    result.seconds = time.perf_counter() - t0
    return result


def report_lines(result: PackResult) -> Tuple[List[str], str]:
    """(problem lines for stderr, the first few; the one-line summary for stdout)."""
    lines = result.problems[:_SHOW]
    if len(result.problems) > _SHOW:
        lines.append(f"... and {len(result.problems) - _SHOW} more (all in {os.path.join(result.out, 'skipped.txt')})")
    if result.dropped_classes:
        shown = ", ".join(result.dropped_classes[:5]) + (" ..." if len(result.dropped_classes) > 5 else "")
        lines.append(f"{len(result.dropped_classes)} class(es) without a usable image dropped ({shown}); "
                     f"labels renumbered, see {os.path.join(result.out, 'classes.txt')}")
    summary = (f"{result.out}: {result.images} images, {result.classes} classes, {result.bytes} bytes, "
               f"{result.skipped} skipped, {result.seconds:.1f} s")
    return lines, summary
