"""Faces in raw photos: a detector (boxes, five landmarks, scores) and the similarity alignment to
the ArcFace 112x112 template. A part: imports utils/ only.

    faces = detect(image_rgb_uint8)          # [Face(box, landmarks (5, 2), score)], best score first
    crop = align_face(image, faces[0].landmarks)   # 112x112, same channels as `image`

The detector is MTCNN (detection/mtcnn.py); its weights come from facenet-pytorch's files,
installed with ``pip install --no-deps facenet-pytorch==2.6.0`` (no download at run time).
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Sequence

import numpy as np

from detection.align import ARCFACE_112, TEMPLATES, align_face, similarity_transform, template

__all__ = ["ARCFACE_112", "TEMPLATES", "Face", "align_face", "choose", "detect", "similarity_transform",
           "template"]

FACE_CHOICES = ("largest", "central", "all")


class Face(NamedTuple):
    box: np.ndarray  # (4,) float64 x1, y1, x2, y2, pixels
    landmarks: np.ndarray  # (5, 2) float64: left eye, right eye, nose, left / right mouth corner, pixels
    score: float  # detector's face probability, 0-1

    @property
    def side(self) -> float:
        """The box's shorter side, pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@functools.lru_cache(maxsize=1)
def _nets():
    from detection.mtcnn import load_nets

    return load_nets()


def detect(image_rgb: np.ndarray, min_size: float = 20.0, min_score: float = 0.0) -> List[Face]:
    """Faces in one (H, W, 3) uint8 RGB image, best score first.

    `min_size`: smallest face side searched for and kept, pixels (MTCNN's pyramid starts there);
    `min_score`: faces whose detector probability is below it are left out.
    """
    from detection.mtcnn import detect_faces

    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"detect needs an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
    if min(image_rgb.shape[:2]) < 12:
        return []
    boxes, marks, scores = detect_faces(_nets(), image_rgb, min_size=max(float(min_size), 12.0))
    faces = [Face(b, m, float(s)) for b, m, s in zip(boxes, marks, scores)]
    faces = [f for f in faces if f.score >= min_score and f.side >= min_size]
    return sorted(faces, key=lambda f: -f.score)


def choose(faces: Sequence[Face], how: str, image_shape: Sequence[int]) -> List[Face]:
    """The face(s) to keep: 'largest' (box area), 'central' (box centre nearest the image centre), 'all'
    (largest first). `image_shape` is (H, W[, C])."""
    if how not in FACE_CHOICES:
        raise ValueError(f"face choice {how!r}: expected one of {', '.join(FACE_CHOICES)}")
    by_area = sorted(faces, key=lambda f: -float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    if how == "all" or not faces:
        return by_area
    if how == "largest":
        return by_area[:1]
    centre = np.array([image_shape[1], image_shape[0]], np.float64) / 2.0
    return [min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2.0 - centre)))]
