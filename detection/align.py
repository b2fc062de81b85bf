"""5-point similarity alignment onto the ArcFace template: the template, Umeyama's fit, the warp.

Why: every insightface pack and every published result uses faces warped so that the
eyes, nose tip and mouth corners land on a fixed template (shared/reference/FORMATS.md).
Coordinates are pixels, x right and y down, pixel centres at integers (OpenCV's
convention, the one the template was measured in). Points are ordered left eye, right
eye, nose, left mouth corner, right mouth corner (as seen in the image).

The 112x96 template is the 112x112 one moved 8 px left: insightface's
``src/common/face_preprocess.py`` stores the 96-wide template and adds 8 to x for 112.
Shared by prepare/ (folders, packs) and inference/ (raw photos at run time).
"""

from __future__ import annotations

from typing import Dict, Tuple

import cv2
import numpy as np

from utils.errors import UserError

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# (height, width) -> template points (5, 2) in output pixels
TEMPLATES: Dict[Tuple[int, int], np.ndarray] = {
    (112, 112): ARCFACE_112,
    (112, 96): ARCFACE_112 - np.array([8.0, 0.0]),
}


class TemplateSizeError(UserError, ValueError):
    """An output size with no alignment template (one line naming the known sizes)."""


def template(size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """The (5, 2) float64 template points, in pixels, for an output of `size` (height, width)."""
    size = (int(size[0]), int(size[1]))
    if size not in TEMPLATES:
        known = ", ".join(f"{h}x{w}" for h, w in TEMPLATES)
        raise TemplateSizeError(f"no alignment template for size {size[0]}x{size[1]} (known: {known})")
    return TEMPLATES[size].copy()


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """The (2, 3) float64 matrix M = [sR | t] minimising sum |dst - (sR src + t)|^2.

    Umeyama's closed form (SVD of the cross-covariance): rotation, uniform scale and
    translation only; a reflection is excluded even when it would fit better.
    """
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_transform needs two (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity_transform: points must be finite numbers")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = float((xs ** 2).sum()) / len(src)
    if var_s <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("similarity_transform: source points all coincide (no scale or rotation defined)")
    cov = xd.T @ xs / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ np.diag(d) @ vt
    scale = float(sig @ d) / var_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image: np.ndarray, landmarks: np.ndarray, size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """Warp `image` (H, W[, C], any channel order) so that `landmarks` (5, 2) land on the template.

    Returns an image of `size` (height, width), same dtype and channels; bilinear, black border.
    """
    m = similarity_transform(landmarks, template(size))
    return cv2.warpAffine(image, m, (int(size[1]), int(size[0])), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
