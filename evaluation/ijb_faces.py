"""The IJB loose crops decoded and aligned exactly as the reference does, fast, and cached on disk.

Per face, as insightface's eval_ijbc.py: the file read as cv2.imread would (3-channel BGR; a grey
JPEG becomes 3 channels; EXIF orientation applied: cv2.imdecode does that as imread does, and
tests/test_ijb_faces.py checks it on this OpenCV), the 5 points (float32 as parsed) fitted to the
ArcFace 112x112 template by Umeyama's similarity, bilinear warp with a black border, BGR -> RGB.
A face whose image is missing, unreadable or undecodable, or whose points all coincide, is zeros
with ok False, as the reference's zero feature; aligned_faces says how many, in one line.

Decoding runs in DataLoader workers, one batch of faces per item, order preserved. The crops of
a release (17.7 GB for IJB-C's 469,375 faces) are cached under <cache>/ijb/<key>/ so that every
checkpoint after the first skips decoding: crops.npy (N, 112, 112, 3) uint8, ok.npy (N,) bool,
entry.json written last (with a sha256 per chunk of rows, checked as the chunks are read back);
the folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from typing import Callable, Iterator, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.ijb import IJBFaces
from data.imageformat import oversize
from detection.align import align_face
from evaluation.cache import default_cache_dir
from utils.errors import UserError
from utils.files import max_image_bytes, read_regular

SIZE = (112, 112)  # (height, width) of every crop: the ArcFace template's
# What the pixels of a cached crop depend on besides the meta files: bump when the recipe changes.
# The OpenCV version is part of it (its JPEG decoder's rounding may change between releases).
ALIGN_VERSION = f"ijb-align-v1/umeyama-bilinear-border0-rgb/opencv-{cv2.__version__}"
CACHE_VERSION = 1
LOADER_TIMEOUT_S = 600.0  # one batch taking longer than this means a stuck worker: fail, do not hang
FREE_MARGIN_BYTES = 1 << 30  # left free on the cache disk after the entry is written


class AlignedBatch(NamedTuple):
    start: int  # row of images[0] in 5pts-file order
    images: np.ndarray  # (B, 112, 112, 3) uint8 RGB
    ok: np.ndarray  # (B,) bool: False for a face with no readable image or degenerate points (images zero)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def align_one(path: str, landmarks: np.ndarray, size: tuple[int, int] = SIZE) -> np.ndarray | None:
    """The aligned RGB crop of one loose crop, or None when the image or the points cannot be used."""
    try:
        buf = np.frombuffer(read_regular(path, "image", max_image_bytes()), np.uint8)
    except (OSError, UserError):
        return None
    if buf.size == 0 or oversize(buf):
        return None
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # as cv2.imread: BGR, 3 channels, EXIF orientation applied
    if img is None:
        return None
    try:  # the one alignment prepare_data.py align and infer.py use: Umeyama, bilinear, border 0
        warped = align_face(img, landmarks, size)
    except ValueError:  # all points equal, or not finite
        return None
    return cv2.cvtColor(warped, cv2.COLOR_BGR2RGB)


class _Batches(Dataset):
    """Item b: the aligned faces of rows [b * batch_size, ...), decoded where the item is fetched (a worker)."""

    def __init__(self, names: np.ndarray, landmarks: np.ndarray, image_dir: str, batch_size: int) -> None:
        self.names, self.landmarks, self.image_dir, self.batch_size = names, landmarks, image_dir, batch_size

    def __len__(self) -> int:
        return -(-len(self.names) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[int, np.ndarray, np.ndarray]:
        start = b * self.batch_size
        stop = min(start + self.batch_size, len(self.names))
        images = np.zeros((stop - start, *SIZE, 3), np.uint8)
        ok = np.zeros(stop - start, bool)
        for k in range(stop - start):
            crop = align_one(os.path.join(self.image_dir, str(self.names[start + k])), self.landmarks[start + k])
            if crop is not None:
                images[k], ok[k] = crop, True
        return start, images, ok


def _start_method() -> str | None:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _collate(item: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    return item  # numpy arrays as they are (no tensor conversion, no copy)


def iter_aligned(faces: IJBFaces, image_dir: str, batch_size: int = 256, workers: int | None = None,
                 progress: bool = False, timeout_s: float = LOADER_TIMEOUT_S) -> Iterator[AlignedBatch]:
    """Aligned crops of every face, in 5pts order, in contiguous batches (decoded by `workers` processes;
    0 decodes in this process; default min(8, cpu count)).

    Workers start from a forkserver, not a fork: a fork copies OpenCV's and OpenMP's thread pools
    in whatever state they are, and a worker touching one can hang (seen here after a first
    in-process alignment). `timeout_s` bounds the wait for any one batch all the same.
    """
    workers = default_workers() if workers is None else int(workers)
    batch_size = max(1, int(batch_size))
    ds = _Batches(np.asarray(faces.names), np.asarray(faces.landmarks, np.float32), image_dir, batch_size)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_init_worker if workers else None, timeout=timeout_s if workers else 0,
                        prefetch_factor=2 if workers else None, persistent_workers=False,
                        multiprocessing_context=_start_method() if workers else None)
    report = _Progress(len(faces.names), progress)
    for start, images, ok in loader:
        report(start + len(ok))
        yield AlignedBatch(int(start), images, ok)


class _Progress:
    """A line to stderr at every tenth of the faces (when asked)."""

    def __init__(self, total: int, on: bool) -> None:
        self.total, self.on, self.next = total, on, 0.1

    def __call__(self, done: int) -> None:
        if self.on and self.total and done / self.total >= self.next:
            _stderr(f"ijb: aligned {done}/{self.total} faces")
            while self.next <= done / self.total:
                self.next += 0.1


def images_signature(faces: IJBFaces, image_dir: str) -> str:
    """sha256 over every loose crop's name, size and mtime (ns), in 5pts order; a missing file counts as such.

    Why: the meta files alone do not pin the pixels: two synthetic sets of one seed and size share
    their meta files byte for byte, and a re-downloaded or edited image keeps its line. One stat per
    face (a second or two for IJB-C's 469k files) instead of decoding them all again.
    """
    h = hashlib.sha256()
    for name in faces.names:
        try:
            st = os.stat(os.path.join(image_dir, str(name)))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0-\n".encode())
    return h.hexdigest()


def entry_key(faces: IJBFaces, image_dir: str, size: tuple[int, int] = SIZE) -> str:
    """The cache entry name: a function of the meta files' bytes, the images' names, sizes and mtimes,
    the crop size and the recipe."""
    text = (f"{faces.key}\n{images_signature(faces, image_dir)}\n{size[0]}x{size[1]}\n{ALIGN_VERSION}\n"
            f"{CACHE_VERSION}")
    return hashlib.sha256(text.encode()).hexdigest()


def _chunk_sha(images: np.ndarray, ok: np.ndarray) -> str:
    h = hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(ok)).cast("B"))
    return h.hexdigest()


def _summary(faces: IJBFaces, ok: np.ndarray, log: Callable[[str], None]) -> None:
    bad = np.flatnonzero(~ok)
    if bad.size:
        names = ", ".join(str(faces.names[i]) for i in bad[:3])
        log(f"warning: {bad.size} of {len(ok)} IJB faces have no readable image or usable 5 points; their crops "
            f"(and features) are zero, as in the reference (first: {names})")


def _read_entry(folder: str, key: str, n: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The entry's arrays and record if complete and well-formed, else None (its data is checked as read)."""
    try:
        with open(os.path.join(folder, "entry.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        crops = np.load(os.path.join(folder, "crops.npy"), mmap_mode="r", allow_pickle=False)
        ok = np.load(os.path.join(folder, "ok.npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None
    good = (isinstance(meta, dict) and meta.get("key") == key and meta.get("version") == CACHE_VERSION
            and meta.get("n") == n and crops.dtype == np.uint8 and crops.shape == (n, *SIZE, 3)
            and ok.dtype == bool and ok.shape == (n,) and isinstance(meta.get("chunk"), int) and meta["chunk"] > 0
            and isinstance(meta.get("sha256"), list) and len(meta["sha256"]) == -(-n // meta["chunk"]))
    return (crops, ok, meta) if good else None


def _from_entry(faces: IJBFaces, image_dir: str, folder: str, crops: np.ndarray, ok: np.ndarray, meta: dict,
                batch_size: int, log: Callable[[str], None]) -> Iterator[AlignedBatch]:
    """Batches read from the memory map; a chunk whose sha256 differs is aligned afresh (and the entry dropped)."""
    chunk, damaged = int(meta["chunk"]), False
    for c, start in enumerate(range(0, len(ok), chunk)):
        images, flags = np.array(crops[start:start + chunk]), ok[start:start + chunk].copy()
        if _chunk_sha(images, flags) != meta["sha256"][c]:
            if not damaged:
                log(f"note: IJB crop cache {folder} does not match its checksums from row {start}; "
                    "aligning those faces again and removing the entry")
            damaged = True
            for k in range(len(flags)):
                crop = align_one(os.path.join(image_dir, str(faces.names[start + k])), faces.landmarks[start + k])
                images[k], flags[k] = (crop, True) if crop is not None else (0, False)
        for s in range(0, len(flags), batch_size):
            yield AlignedBatch(start + s, images[s:s + batch_size], flags[s:s + batch_size])
    if damaged:
        shutil.rmtree(folder, ignore_errors=True)


def _free_bytes(folder: str) -> int:
    probe = folder
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def aligned_faces(faces: IJBFaces, image_dir: str, cache_dir: str | None = "default", batch_size: int = 256,
                  workers: int | None = None, progress: bool = False,
                  log: Callable[[str], None] = _stderr) -> Iterator[AlignedBatch]:
    """iter_aligned's batches, from the crop cache when these meta files were aligned before.

    cache_dir: the cache root ("default": evaluation.cache.default_cache_dir(); None: no cache);
    the entry is <cache_dir>/ijb/<entry_key(faces, image_dir)>/. Without room for the entry on that disk the
    run is uncached, with one line to `log`.
    """
    n, batch_size = len(faces.names), max(1, int(batch_size))
    cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
    if not cache_dir or n == 0:
        yield from _summarised(faces, iter_aligned(faces, image_dir, batch_size, workers, progress), log)
        return
    key = entry_key(faces, image_dir)
    folder = os.path.join(cache_dir, "ijb", key)
    hit = _read_entry(folder, key, n)
    if hit is not None:
        log(f"ijb: aligned crops of {n} faces from the cache {folder}")
        crops, ok, meta = hit
        _summary(faces, ok, log)
        yield from _from_entry(faces, image_dir, folder, crops, ok, meta, batch_size, log)
        return
    need = n * (SIZE[0] * SIZE[1] * 3 + 1) + FREE_MARGIN_BYTES
    try:
        free = _free_bytes(folder)
    except OSError:
        free = 0
    if free < need:
        log(f"note: not caching the IJB crops: {need / 2**30:.1f} GiB needed under {cache_dir}, "
            f"{free / 2**30:.1f} GiB free (set $FACETRAIN_CACHE to a larger disk)")
        yield from _summarised(faces, iter_aligned(faces, image_dir, batch_size, workers, progress), log)
        return
    yield from _write_through(faces, image_dir, folder, key, batch_size, workers, progress, log)


def _summarised(faces: IJBFaces, batches: Iterator[AlignedBatch], log: Callable[[str], None]) -> Iterator[AlignedBatch]:
    ok = np.zeros(len(faces.names), bool)
    for batch in batches:
        ok[batch.start:batch.start + len(batch.ok)] = batch.ok
        yield batch
    _summary(faces, ok, log)


def _write_through(faces: IJBFaces, image_dir: str, folder: str, key: str, batch_size: int, workers: int | None,
                   progress: bool, log: Callable[[str], None]) -> Iterator[AlignedBatch]:
    """Align, yield, and write the entry as the batches go by; renamed into place only when complete."""
    n = len(faces.names)
    tmp = os.path.join(os.path.dirname(folder), f".{key}.{os.getpid()}.tmp")
    ok_all = np.zeros(n, bool)
    shas: list[str] = []
    crops = None
    try:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            crops = np.lib.format.open_memmap(os.path.join(tmp, "crops.npy"), mode="w+", dtype=np.uint8,
                                              shape=(n, *SIZE, 3))
        except OSError as exc:
            log(f"note: not caching the IJB crops: {exc}")
        for batch in iter_aligned(faces, image_dir, batch_size, workers, progress):
            stop = batch.start + len(batch.ok)
            ok_all[batch.start:stop] = batch.ok
            if crops is not None:
                try:
                    crops[batch.start:stop] = batch.images
                    shas.append(_chunk_sha(batch.images, batch.ok))
                except OSError as exc:
                    log(f"note: stopped caching the IJB crops: {exc}")
                    crops = None
            yield batch
        _summary(faces, ok_all, log)
        if crops is not None:
            try:
                crops.flush()
                del crops
                crops = None
                with open(os.path.join(tmp, "ok.npy"), "wb") as fh:
                    np.save(fh, ok_all, allow_pickle=False)
                meta = {"key": key, "version": CACHE_VERSION, "align": ALIGN_VERSION, "faces_key": faces.key,
                        "n": n, "not_ok": int((~ok_all).sum()), "chunk": batch_size, "sha256": shas}
                with open(os.path.join(tmp, "entry.json"), "w", encoding="utf-8") as fh:
                    json.dump(meta, fh)
                if os.path.isdir(folder):  # a damaged or concurrent entry: ours is complete and checked
                    shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
            except OSError as exc:
                log(f"note: could not store the IJB crop cache: {exc}")
    finally:
        crops = None
        shutil.rmtree(tmp, ignore_errors=True)
