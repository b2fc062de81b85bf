"""Additive angular margins: ArcFace, sub-center ArcFace and the combined (m1, m2, m3) margin.

ArcFace (Deng et al., CVPR 2019) replaces the target logit cos(theta) by cos(theta + m).
Sub-center ArcFace (Deng et al., ECCV 2020) gives each class K centres and keeps the
closest. The combined margin of the ArcFace paper is cos(m1*theta + m2) - m3, which
covers SphereFace-like (m1), ArcFace (m2) and CosFace (m3) margins.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from .base import MarginHead, check_positive, gather_target, put_target, register

# Smallest value of 1 - cos^2 under the square root: keeps sin(theta) and its gradient finite at cos = +-1.
SIN_EPS = 1e-12


def safe_sin(cos: Tensor) -> Tensor:
    """sin(theta) = sqrt(max(1 - cos^2, 1e-12)) for theta in [0, pi]: finite value and gradient at cos = +-1."""
    return torch.sqrt((1.0 - cos * cos).clamp(min=SIN_EPS))


def arc_margin(cos: Tensor, m: float | Tensor, easy_margin: bool = False) -> Tensor:
    """cos(theta + m) given cos = cos(theta), with ArcFace's fallback where theta + m would pass pi.

    cos(theta + m) = cos*cos(m) - sin*sin(m), with ``safe_sin``. Where cos <= cos(pi - m)
    (theta >= pi - m) the value is cos - m*sin(m) instead (insightface's ``cos - mm``,
    mm = sin(pi - m)*m), which keeps the logit decreasing in theta; with ``easy_margin``
    the margin is applied only where cos > 0 and the cosine is left as is elsewhere.
    ``m`` may be a tensor broadcastable to ``cos`` (per-sample margins); radians.
    """
    m = torch.as_tensor(m, dtype=cos.dtype, device=cos.device)
    cos_m, sin_m = torch.cos(m), torch.sin(m)
    phi = cos * cos_m - safe_sin(cos) * sin_m
    if easy_margin:
        return torch.where(cos > 0, phi, cos)
    return torch.where(cos > -cos_m, phi, cos - m * sin_m)  # -cos(m) = cos(pi - m)


@register("arcface")
class ArcFace(MarginHead):
    """Target logit s*cos(theta + m), others s*cos(theta); fallback as in :func:`arc_margin`."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        check_positive("arcface", s=s)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"arcface: m must be in [0, pi) radians, got {m}")
        super().__init__(embedding_size, num_classes)
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        target = arc_margin(gather_target(cos, labels), self.m, self.easy_margin)
        return put_target(cos, labels, target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, easy_margin={self.easy_margin}"


@register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """ArcFace over K sub-centres per class: cos(x, class c) = max_k cos(x, W[c*K + k]).

    ``weight`` has ``num_classes * K`` rows, class-major (class c owns rows c*K .. c*K+K-1),
    so a class shard is a contiguous block of rows; :meth:`cosine` returns one column per
    class. The paper's later step (dropping non-dominant sub-centres and noisy samples)
    is not part of the head.
    """

    def __init__(self, embedding_size: int, num_classes: int, K: int = 3, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False) -> None:
        if int(K) != K or K < 1:
            raise ValueError(f"subcenter_arcface: K must be a positive integer, got {K}")
        self.rows_per_class = int(K)
        super().__init__(embedding_size, num_classes, s=s, m=m, easy_margin=easy_margin)

    def cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        cos = super().cosine(embeddings, weight)
        return cos.view(cos.shape[0], -1, self.rows_per_class).amax(dim=2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, K={self.rows_per_class}"


# (m1, m2, m3) of the combined margin that reproduce the named losses.
COMBINED_PRESETS: Dict[str, Dict[str, float]] = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
}


@register("combined")
class CombinedMargin(MarginHead):
    """Target logit s*(cos(m1*theta + m2) - m3), others s*cos(theta).

    theta = atan2(safe_sin(cos), cos), equal to arccos(cos) inside (-1, 1) and within
    1e-6 rad of 0 / pi at cos = +-1, with a finite gradient there (an arccos of a clamped
    cosine would bias the logit by ~1e-3 rad at the ends instead).

    Fallback: where m1*theta + m2 > pi, i.e. theta > theta_max = (pi - m2)/m1, the
    target is cos(theta) - mm - m3 with mm = max((pi - theta_max)*sin(theta_max),
    1 + cos(theta_max)). The first term is ArcFace's mm = m*sin(m) generalised (the
    penalty of the margin linearised at theta_max), so (1, m, 0) reproduces ArcFace
    exactly; the second makes sure the value at theta_max is not above -1 - m3, so the
    logit stays monotonic decreasing in theta across the switch.
    """

    def __init__(self, embedding_size: int, num_classes: int, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 s: float = 64.0) -> None:
        check_positive("combined", s=s, m1=m1)
        if m2 < 0 or m3 < 0:
            raise ValueError(f"combined: m2 and m3 must be >= 0, got m2={m2}, m3={m3}")
        super().__init__(embedding_size, num_classes)
        self.m1, self.m2, self.m3, self.s = float(m1), float(m2), float(m3), float(s)
        theta_max = (math.pi - self.m2) / self.m1
        self.threshold = math.cos(theta_max) if theta_max < math.pi else -math.inf
        self.mm = max((math.pi - theta_max) * math.sin(theta_max), 1.0 + math.cos(theta_max))

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        cos_y = gather_target(cos, labels)
        theta = torch.atan2(safe_sin(cos_y), cos_y)
        target = torch.where(cos_y > self.threshold, torch.cos(self.m1 * theta + self.m2), cos_y - self.mm) - self.m3
        return put_target(cos, labels, target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.s}"
