"""Faces in a video or a camera stream: every frame's faces detected, aligned, identified against a
facebank, and drawn (box + "name score", or "unknown score" below the threshold).

Frames come from cv2.VideoCapture (BGR uint8) and go to cv2.VideoWriter with the input's size and
fps, one written frame per read frame. The codec follows OUT's extension: .mp4 -> mp4v (MPEG-4
part 2), .avi -> MJPG; both encode and read back in the opencv-python-headless wheel (its FFmpeg
has no H.264 encoder, so avc1 is not offered).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from config import ConfigError

from . import facebank as fb
from .embed import embed_images
from .faces import DetectRules, detect_faces
from .model import EmbeddingModel

CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
DEFAULT_FPS = 25.0  # a camera that reports no rate
KNOWN = (0, 200, 0)  # BGR box colours
UNKNOWN = (0, 0, 230)


class VideoError(ConfigError):
    """A video that cannot be opened or written (one line naming the file or the camera)."""


@dataclass
class FrameFace:
    box: np.ndarray  # (4,) x1, y1, x2, y2 pixels
    name: str  # facebank identity or fb.UNKNOWN
    score: float  # cosine with the best identity
    detector_score: float  # 0-1


@dataclass
class Summary:
    frames: int = 0
    faces: int = 0
    seen: Counter = field(default_factory=Counter)  # name -> frames-faces labelled with it
    interrupted: bool = False

    def text(self) -> str:
        names = ", ".join(f"{n} ({k})" for n, k in sorted(self.seen.items(), key=lambda t: (-t[1], t[0])))
        return (f"{self.frames} frames, {self.faces} faces; names seen: {names or 'none'}"
                + (" (stopped by Ctrl-C)" if self.interrupted else ""))


def codec_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in CODECS:
        raise VideoError(f"{path}: write a .mp4 (mp4v) or .avi (MJPG) video")
    return CODECS[ext]


def open_capture(source, what: str) -> cv2.VideoCapture:
    """cv2.VideoCapture of a file path or a camera index; VideoError naming it if it does not open."""
    if isinstance(source, str) and not os.path.isfile(source):
        kind = "a folder, not a video file" if os.path.isdir(source) else "no such video file"
        raise FileNotFoundError(f"{source}: {kind}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        why = "no such camera, or no access to it" if isinstance(source, int) else "OpenCV cannot open it as a video"
        raise VideoError(f"{what}: {why}")
    return cap


def open_writer(path: str, fps: float, size: Tuple[int, int]) -> cv2.VideoWriter:
    """A VideoWriter of (width, height) ``size`` at ``fps``, codec from the extension."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec_for(path)), fps, size)
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write a {codec_for(path)} video here")
    return writer


def frames(cap: cv2.VideoCapture, max_frames: int = 0) -> Iterator[np.ndarray]:
    """BGR frames until the stream ends (or ``max_frames`` > 0 of them)."""
    n = 0
    while max_frames <= 0 or n < max_frames:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        n += 1
        yield frame


class Labeller:
    """One frame in, its identified faces out (and drawn onto a copy)."""

    def __init__(self, model: EmbeddingModel, bank: fb.Facebank, threshold: float, rules: DetectRules):
        self.model, self.bank, self.threshold, self.rules = model, bank, threshold, rules

    def identify(self, frame_bgr: np.ndarray) -> List[FrameFace]:
        rgb = np.ascontiguousarray(frame_bgr[..., ::-1])
        found = detect_faces(rgb, self.rules)
        if not found:
            return []
        emb = embed_images(self.model, np.stack([crop for _, crop in found]), self.bank.tta)
        matches = fb.match(self.bank, emb, self.threshold, 1)
        return [FrameFace(f.box, m.name, m.score, f.score) for (f, _), m in zip(found, matches)]

    @staticmethod
    def draw(frame_bgr: np.ndarray, faces: List[FrameFace]) -> np.ndarray:
        out = frame_bgr.copy()
        for f in faces:
            colour = UNKNOWN if f.name == fb.UNKNOWN else KNOWN
            x1, y1, x2, y2 = (int(round(v)) for v in f.box)
            cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
            label = f"{f.name} {f.score:.2f}"
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            ty = y1 - 4 if y1 - th - base - 4 >= 0 else y2 + th + 4
            cv2.rectangle(out, (x1, ty - th - 2), (x1 + tw + 2, ty + base - 2), colour, cv2.FILLED)
            cv2.putText(out, label, (x1 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                        cv2.LINE_AA)
        return out


def run_stream(cap: cv2.VideoCapture, labeller: Labeller, writer: cv2.VideoWriter | None = None,
               max_frames: int = 0, progress: bool = True,
               per_frame: Callable[[int, List[FrameFace]], None] | None = None) -> Summary:
    """Label every frame of ``cap``, write it to ``writer`` (if any), call ``per_frame(index, faces)``.

    Ends at the end of the stream, after ``max_frames`` (> 0), or on Ctrl-C (the frames so far are kept).
    """
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if max_frames > 0:
        total = min(total, max_frames) if total > 0 else max_frames
    summary = Summary()
    bar = tqdm(total=total if total > 0 else None, desc="frames", unit="frame", disable=not progress,
               dynamic_ncols=True)
    try:
        for frame in frames(cap, max_frames):
            faces = labeller.identify(frame)
            if writer is not None:
                writer.write(Labeller.draw(frame, faces))
            if per_frame is not None:
                per_frame(summary.frames, faces)
            summary.frames += 1
            summary.faces += len(faces)
            summary.seen.update(f.name for f in faces)
            bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    return summary


def frame_line(index: int, faces: List[FrameFace]) -> str:
    """One line per frame: 'frame 12: alice 0.71 [x1,y1,x2,y2]; unknown 0.12 [...]'."""
    items = "; ".join(f"{f.name} {f.score:.3f} [{','.join(str(int(round(v))) for v in f.box)}]" for f in faces)
    return f"frame {index}: {items or 'no face'}"


def stream_fps(cap: cv2.VideoCapture) -> float:
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    return fps if np.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS


def stream_size(cap: cv2.VideoCapture) -> Tuple[int, int]:
    return int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
