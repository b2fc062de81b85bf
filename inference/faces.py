"""Raw photos and video frames -> the aligned 112x112 faces the model embeds (``--detect``).

The detector and the warp are detection/'s (MTCNN, the ArcFace-template similarity); the rules
(which face, smallest side in pixels, smallest detector probability 0-1) are prepare/align's
DetectRules, so ``infer.py --detect`` keeps the faces ``prepare_data.py align --detect`` keeps.
Images here are RGB uint8 (H, W, 3); OpenCV frames are converted by the caller.
"""

from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np

import detection
from config import ConfigError
from data.imageformat import oversize
from prepare.align import DetectRules
from utils.files import UnreadableFileError, max_image_bytes, read_regular

from .model import INPUT_SIZE

__all__ = ["DetectRules", "NoFaceError", "check_rules", "detect_faces", "no_face", "read_face", "read_photo"]


class NoFaceError(ValueError):
    """A photo in which no face passes the rules (listed as failed, not fatal)."""


def check_rules(rules: DetectRules) -> DetectRules:
    if not 0 <= rules.min_score <= 1 or rules.min_face < 0:
        raise ConfigError(f"--min-score {rules.min_score:g} / --min-face {rules.min_face:g}: expected a "
                          "probability 0-1 and a size in pixels >= 0")
    return rules


def no_face(rules: DetectRules) -> str:
    return f"no face found (min face {rules.min_face:g} px, min score {rules.min_score:g})"


def read_photo(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file at its own size; UnreadableFileError if it cannot be used."""
    buf = np.frombuffer(read_regular(path, "image", max_image_bytes()), np.uint8)
    why = oversize(buf) if buf.size else "empty file"
    img = None if why else cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise UnreadableFileError(f"{path}: {why or 'not a decodable image (JPEG/PNG/BMP/WebP)'}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def detect_faces(rgb: np.ndarray, rules: DetectRules) -> List[Tuple[detection.Face, np.ndarray]]:
    """[(face, its aligned 112x112 RGB crop)] of the face(s) ``rules.face`` chooses (largest first for 'all')."""
    found = detection.detect(np.ascontiguousarray(rgb), min_size=rules.min_face, min_score=rules.min_score)
    return [(f, detection.align_face(rgb, f.landmarks, INPUT_SIZE))
            for f in detection.choose(found, rules.face, rgb.shape)]


def read_face(path: str, rules: DetectRules) -> np.ndarray:
    """The chosen face of a raw photo, aligned: (112, 112, 3) uint8 RGB; NoFaceError if there is none."""
    found = detect_faces(read_photo(path), rules)
    if not found:
        raise NoFaceError(f"{path}: {no_face(rules)}")
    return found[0][1]
