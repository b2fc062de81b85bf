"""Aligning folders of face images: landmarks files, detection on the fly, the per-image jobs.

The geometry (the ArcFace template, Umeyama's similarity fit, the warp) lives in
detection/align.py, shared with inference/; this module re-exports it for its callers.
"""

from __future__ import annotations

import os
import re
import time
from typing import Dict, Iterator, List, NamedTuple, Tuple

import cv2
import numpy as np

from data.imageformat import oversize
from data.sources import IMAGE_EXTENSIONS, DataSourceError
from detection import align as _core
from detection.align import ARCFACE_112, TEMPLATES, align_face, similarity_transform  # noqa: F401 (re-exported)
from utils.atomic import write_bytes
from utils.files import UnreadableFileError, max_image_bytes, read_regular

_LINE = re.compile(r"^(?P<path>.+?)[\s,]+(?P<nums>(?:[^\s,]+[\s,]+){9}[^\s,]+)[\s,]*$")
_SPLIT = re.compile(r"[\s,]+")
MAX_COORD = 1e6  # pixels: a landmark farther out than this is in no photo (and would overflow the warp)


class AlignError(DataSourceError):
    """Input that stops the whole alignment run (no landmarks file, bad SRC/OUT, unknown size)."""


def template(size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """The (5, 2) float64 template points, in pixels, for an output of `size` (height, width)."""
    try:
        return _core.template(size)
    except _core.TemplateSizeError as exc:
        raise AlignError(str(exc)) from None


class Entry(NamedTuple):
    line: int  # 1-based line number in the landmarks file
    path: str  # relative to SRC, normalised
    points: np.ndarray  # (5, 2) float64


class BadLine(NamedTuple):
    line: int
    path: str  # the path the line seems to name ('' if none), so its image is not also reported as unlisted
    what: str


def parse_landmarks(path: str) -> Tuple[List[Entry], List[BadLine]]:
    """The usable lines of a landmarks file, and the unusable ones with what is wrong.

    A line is `relative/path.jpg x1 y1 ... x5 y5`, whitespace or commas between fields
    (the path may hold spaces). Blank lines and lines starting with '#' are ignored.
    """
    if not os.path.isfile(path):
        raise AlignError(f"{path}: no such landmarks file (expected lines 'path x1 y1 ... x5 y5')")
    entries: List[Entry] = []
    bad: List[BadLine] = []
    first_line: Dict[str, int] = {}
    with open(path, encoding="utf-8-sig", errors="replace") as fh:  # -sig: a BOM (Windows editors) is no path
        for n, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                fields = [f for f in _SPLIT.split(line) if f]
                bad.append(BadLine(n, os.path.normpath(fields[0]),
                                   f"{len(fields)} fields, expected a path and 10 numbers x1 y1 ... x5 y5"))
                continue
            rel = os.path.normpath(match["path"].strip())
            try:
                pts = np.array([float(v) for v in _SPLIT.split(match["nums"])], dtype=np.float64).reshape(5, 2)
            except ValueError:
                bad.append(BadLine(n, rel, f"{match['nums'][:60]!r} are not 10 numbers x1 y1 ... x5 y5"))
                continue
            if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
                bad.append(BadLine(n, "", f"path {match['path']!r} must be relative to SRC and inside it"))
            elif not np.isfinite(pts).all():
                bad.append(BadLine(n, rel, f"landmarks {pts.ravel().tolist()} are not all finite"))
            elif np.abs(pts).max() > MAX_COORD:
                bad.append(BadLine(n, rel, f"landmark coordinate {np.abs(pts).max():g} is beyond {MAX_COORD:g} "
                                           "pixels (expected pixel coordinates inside the image)"))
            elif float(((pts - pts.mean(axis=0)) ** 2).sum()) < 1e-6:
                bad.append(BadLine(n, rel, "the 5 landmarks coincide (no face geometry)"))
            elif rel in first_line:
                bad.append(BadLine(n, rel, f"{rel} already listed at line {first_line[rel]} (one face per image)"))
            else:
                first_line[rel] = n
                entries.append(Entry(n, rel, pts))
    return entries, bad


def list_images(src: str, exclude: str | None = None) -> Iterator[str]:
    """Relative paths of the image files under `src` (sorted walk), skipping the `exclude` folder."""
    exclude = os.path.abspath(exclude) if exclude else None
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != exclude)
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                yield os.path.relpath(os.path.join(root, name), src)


def non_images(src: str, exclude: str | None = None) -> List[str]:
    """Relative paths of the visible files under `src` that list_images leaves out (no image extension:
    readme.txt, .tif, .gif, ...), sorted walk: what a run reports as skipped rather than dropping unsaid."""
    exclude = os.path.abspath(exclude) if exclude else None
    out: List[str] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != exclude)
        out.extend(os.path.relpath(os.path.join(root, name), src) for name in sorted(files)
                   if not name.startswith(".") and not name.lower().endswith(IMAGE_EXTENSIONS))
    return out


def _encode_params(ext: str, jpeg_quality: int) -> List[int]:
    return [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []


def _check_folders(src: str, out: str) -> None:
    """SRC a folder, OUT neither SRC nor inside it nor around it (originals must not be overwritten)."""
    if not os.path.isdir(src):
        raise AlignError(f"{src}: no such directory (SRC must be a folder of images)")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if real_src == real_out:
        raise AlignError(f"{out}: OUT is SRC (same folder: {real_src}); the originals would be overwritten "
                         "(choose another OUT)")
    if real_out.startswith(real_src.rstrip(os.sep) + os.sep):
        raise AlignError(f"{out}: OUT is inside SRC ({real_src}); choose an OUT outside it")
    if real_src.startswith(real_out.rstrip(os.sep) + os.sep):
        raise AlignError(f"{out}: SRC {src} is inside OUT ({real_out}); aligned files could overwrite the "
                         "originals: choose an OUT outside it")


def _read_image(path: str) -> np.ndarray | str:
    """The decoded BGR image, or what is wrong with the file (one phrase)."""
    try:
        data = read_regular(path, "image", max_image_bytes())
    except FileNotFoundError:
        return "no such file"
    except UnreadableFileError as exc:
        return str(exc).removeprefix(path + ": ")
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not data:
        return "empty file"
    buf = np.frombuffer(data, np.uint8)
    why = oversize(buf)  # OpenCV would allocate up to 1 Gpx, or assert (cv2.error) beyond
    if why:
        return f"{why}; refused undecoded"
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        return f"not a decodable image (OpenCV: {str(exc).strip().splitlines()[-1][:120]})"
    return "not a decodable image" if img is None else img


def _align_one(job: Tuple[str, str, str, Entry, Tuple[int, int], int]) -> str | None:
    """Read, align, encode and atomically write one image; a `file:line: what` problem or None."""
    src, out, lm_path, entry, size, jpeg_quality = job
    where = f"{lm_path}:{entry.line}: {os.path.join(src, entry.path)}"
    img = _read_image(os.path.join(src, entry.path))
    if isinstance(img, str):
        return f"{where}: {img}"
    ext = os.path.splitext(entry.path)[1].lower()
    try:
        aligned = align_face(img, entry.points, size)
    except (ValueError, OverflowError, cv2.error) as exc:  # degenerate or extreme landmarks
        return f"{where}: cannot align ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    ok, buf = cv2.imencode(ext, aligned, _encode_params(ext, jpeg_quality))
    if not ok:
        return f"{where}: OpenCV cannot write {ext} files"
    target = os.path.join(out, entry.path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_bytes(target, buf.tobytes())
    return None


def _worker_init() -> None:
    cv2.setNumThreads(1)  # the pool's processes already run in parallel


def align_folder(src: str, out: str, landmarks: str, size: Tuple[int, int] = (112, 112), jpeg_quality: int = 95,
                 workers: int = 1, progress: bool = True) -> dict:
    """Align every image listed in `landmarks` from `src` into `out`, keeping relative paths and formats.

    Bad landmark lines, missing or undecodable files, and images under `src` with no
    landmark line are skipped and returned as one-line problems; nothing is half-written.
    Returns {'aligned', 'skipped', 'problems', 'listed', 'seconds', 'size'}.
    """
    from tqdm import tqdm

    _check_folders(src, out)
    if not 0 <= jpeg_quality <= 100:
        raise AlignError(f"JPEG quality {jpeg_quality} is outside 0..100")
    size = (int(size[0]), int(size[1]))
    template(size)  # unknown size: fail before any work
    t0 = time.perf_counter()
    entries, bad = parse_landmarks(landmarks)
    problems = [f"{landmarks}:{b.line}: {b.what}" for b in bad]
    listed = {e.path for e in entries} | {b.path for b in bad}
    problems += [f"{os.path.join(src, rel)}: no landmarks line in {landmarks}"
                 for rel in list_images(src, exclude=out) if rel not in listed]
    jobs = ((src, out, landmarks, e, size, jpeg_quality) for e in entries)
    bar = tqdm(total=len(entries), desc="align", unit="img", disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init)
            results = pool.imap(_align_one, jobs, chunksize=16)
        else:
            results = map(_align_one, jobs)
        aligned = 0
        for problem in results:
            if problem is None:
                aligned += 1
            else:
                problems.append(problem)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return {"aligned": aligned, "skipped": len(problems), "problems": problems, "listed": len(entries),
            "size": size, "seconds": time.perf_counter() - t0}


class DetectRules(NamedTuple):
    """How faces are found in raw photos (detection.detect / detection.choose)."""

    face: str = "largest"  # largest | central | all
    min_face: float = 20.0  # pixels: smallest face side searched for and kept
    min_score: float = 0.8  # detector probability 0-1 (MTCNN itself keeps >= 0.7)


def detect_and_align(img_bgr: np.ndarray, rules: DetectRules, size: Tuple[int, int] = (112, 112)
                     ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """[(aligned BGR crop of `size`, its (5, 2) landmarks in the photo's pixels)] for the chosen face(s);
    empty when no face passes the rules."""
    import detection

    faces = detection.detect(np.ascontiguousarray(img_bgr[..., ::-1]), min_size=rules.min_face,
                             min_score=rules.min_score)
    return [(align_face(img_bgr, f.landmarks, size), f.landmarks)
            for f in detection.choose(faces, rules.face, img_bgr.shape)]


def _numbered(rel: str, k: int) -> str:
    stem, ext = os.path.splitext(rel)
    return f"{stem}_{k}{ext}"


def detect_folder(src: str, out: str, rules: DetectRules = DetectRules(), size: Tuple[int, int] = (112, 112),
                  jpeg_quality: int = 95, save_landmarks: str | None = None, progress: bool = True) -> dict:
    """Find the face(s) in every image under `src`, align them into `out` (same relative paths; with
    rules.face == 'all', numbered `name_0.jpg`, `name_1.jpg`, ... largest first).

    Images without a face (or unreadable) are returned as one-line problems. `save_landmarks` writes
    the chosen faces' landmarks in the landmarks-file format, so `align --landmarks FILE` redoes the crops.
    Returns {'aligned' (crops written), 'images', 'skipped', 'problems', 'seconds', 'size'}.
    """
    from tqdm import tqdm

    from utils.atomic import write_text

    _check_folders(src, out)
    if save_landmarks and rules.face == "all":
        raise AlignError(f"--save-landmarks {save_landmarks}: a landmarks file holds one face per image; "
                         "use --face largest or central")
    if not 0 <= jpeg_quality <= 100:
        raise AlignError(f"JPEG quality {jpeg_quality} is outside 0..100")
    size = (int(size[0]), int(size[1]))
    template(size)
    t0 = time.perf_counter()
    rels = list(list_images(src, exclude=out))
    problems: List[str] = [f"{os.path.join(src, rel)}: not an image file by its extension (expected "
                           f"{'/'.join(IMAGE_EXTENSIONS)})" for rel in non_images(src, exclude=out)]
    lines: List[str] = []
    aligned = 0
    for rel in tqdm(rels, desc="detect+align", unit="img", disable=not progress, dynamic_ncols=True):
        path = os.path.join(src, rel)
        img = _read_image(path)
        if isinstance(img, str):
            problems.append(f"{path}: {img}")
            continue
        found = detect_and_align(img, rules, size)
        if not found:
            problems.append(f"{path}: no face found (min face {rules.min_face:g} px, min score {rules.min_score:g})")
            continue
        ext = os.path.splitext(rel)[1].lower()
        for k, (crop, points) in enumerate(found):
            target = _numbered(rel, k) if rules.face == "all" else rel
            ok, buf = cv2.imencode(ext, crop, _encode_params(ext, jpeg_quality))
            if not ok:
                problems.append(f"{path}: OpenCV cannot write {ext} files")
                break
            os.makedirs(os.path.dirname(os.path.join(out, target)), exist_ok=True)
            write_bytes(os.path.join(out, target), buf.tobytes())
            aligned += 1
            lines.append(rel + " " + " ".join(f"{v:.3f}" for v in points.ravel()) + "\n")
    if save_landmarks:
        write_text(save_landmarks, "# path x1 y1 ... x5 y5 (left eye, right eye, nose, left mouth, right mouth; "
                                   "pixels), written by prepare_data.py align --detect\n" + "".join(lines))
    return {"aligned": aligned, "images": len(rels), "skipped": len(problems), "problems": problems,
            "size": size, "seconds": time.perf_counter() - t0}
