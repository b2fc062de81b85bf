"""Additive angular margins: ArcFace, sub-center ArcFace and the combined (m1, m2, m3) margin.

ArcFace (Deng et al., CVPR 2019) replaces the target logit cos(theta) by cos(theta + m).
Sub-center ArcFace (Deng et al., ECCV 2020) gives each class K centres and keeps the
closest. The combined margin of the ArcFace paper is cos(m1*theta + m2) - m3, which
covers SphereFace-like (m1), ArcFace (m2) and CosFace (m3) margins.

Where we differ from insightface ``recognition/arcface_torch`` (``losses.py``), and why:

* gradient: arcface_torch computes the margin under ``torch.no_grad`` (arccos, + m, cos, in
  place on the logits), so the target logit's value is cos(theta + m) but its gradient is
  that of cos(theta) (straight-through). We differentiate cos(theta + m) itself, the
  published loss. ``grad_mode="arcface_torch"`` reproduces theirs.
* theta + m > pi: arcface_torch has no fallback (cos(theta + m) rises again past pi, so the
  target logit stops decreasing in theta); we use ``cos - m*sin(m)`` there, as insightface's
  own mxnet ArcFace and the paper's code. ``grad_mode="arcface_torch"`` drops it too.
* combined margins: arcface_torch applies only m3 (CosFace) when m3 > 0, silently ignoring
  m1 and m2, and refuses m1 != 1; we compute cos(m1*theta + m2) - m3 for any (m1, m2, m3).
  With ``grad_mode="arcface_torch"`` we refuse what theirs would not compute as written.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from .base import MarginHead, check_bool, check_int, check_positive, check_real, gather_target, put_target, register

MAX_SUBCENTERS = 100  # sub-centres per class; the paper uses 3 (10 at most)

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


def arc_margin_straight_through(cos: Tensor, m: float) -> Tensor:
    """arcface_torch's target: value cos(arccos(cos) + m) (no fallback past pi), gradient that of ``cos``.

    d(result)/d(cos) = 1: the margin shifts the value the softmax sees but not the direction
    the gradient takes, as when the margin is applied in place under ``torch.no_grad``.
    """
    with torch.no_grad():
        shifted = torch.cos(torch.acos(cos) + m)
    return cos + (shifted - cos).detach()


GRAD_MODES = ("exact", "arcface_torch")


def check_grad_mode(head: str, grad_mode: str) -> str:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"{head}: grad_mode must be one of {', '.join(map(repr, GRAD_MODES))}, got {grad_mode!r}")
    return grad_mode


@register("arcface")
class ArcFace(MarginHead):
    """Target logit s*cos(theta + m), others s*cos(theta); fallback as in :func:`arc_margin`.

    ``m`` in [0, pi) radians, ``s`` > 0. ``grad_mode``: ``"exact"`` (default) differentiates
    the target logit as computed; ``"arcface_torch"`` reproduces insightface arcface_torch's
    ArcFace exactly: value cos(theta + m) with no fallback past pi, gradient straight through
    as if the target were cos(theta) (see the module docstring). It has no easy margin.
    """

    head_name = "arcface"  # the registered name, for error messages

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False, grad_mode: str = "exact") -> None:
        name = self.head_name
        check_positive(name, s=s)
        m = check_real(name, "m", m, "in [0, pi) radians", lambda v: 0.0 <= v < math.pi)
        easy_margin = check_bool(name, "easy_margin", easy_margin)
        grad_mode = check_grad_mode(name, grad_mode)
        if easy_margin and grad_mode == "arcface_torch":
            raise ValueError(f"{name}: easy_margin has no arcface_torch counterpart (its ArcFace never uses it); "
                             f"use grad_mode='exact' or easy_margin=false")
        super().__init__(embedding_size, num_classes)
        self.s, self.m, self.easy_margin, self.grad_mode = float(s), m, easy_margin, grad_mode

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        cos_y = gather_target(cos, labels)
        if self.grad_mode == "arcface_torch":
            target = arc_margin_straight_through(cos_y, self.m)
        else:
            target = arc_margin(cos_y, self.m, self.easy_margin)
        return put_target(cos, labels, target) * self.s

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, s={self.s}, m={self.m}, easy_margin={self.easy_margin}, "
                f"grad_mode={self.grad_mode!r}")


@register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """ArcFace over K sub-centres per class: cos(x, class c) = max_k cos(x, W[c*K + k]).

    ``weight`` has ``num_classes * K`` rows, class-major (class c owns rows c*K .. c*K+K-1),
    so a class shard is a contiguous block of rows; :meth:`cosine` returns one column per
    class. The paper's later step (dropping non-dominant sub-centres and noisy samples)
    is not part of the head.
    """

    head_name = "subcenter_arcface"

    def __init__(self, embedding_size: int, num_classes: int, K: int = 3, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False, grad_mode: str = "exact") -> None:
        self.rows_per_class = check_int("subcenter_arcface", "K", K, 1, MAX_SUBCENTERS)
        super().__init__(embedding_size, num_classes, s=s, m=m, easy_margin=easy_margin, grad_mode=grad_mode)

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

    Ranges: m1 in (0, 16], m2 in [0, pi) radians, m3 in [0, 2), s > 0. ``grad_mode`` as for
    :class:`ArcFace`; ``"arcface_torch"`` accepts only what arcface_torch computes as written:
    (1, m2, 0) (ArcFace, straight-through gradient, no fallback) or (1, 0, m3) (CosFace).
    """

    def __init__(self, embedding_size: int, num_classes: int, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 s: float = 64.0, grad_mode: str = "exact") -> None:
        check_positive("combined", s=s)
        m1 = check_real("combined", "m1", m1, "in (0, 16] (multiplicative angular margin)", lambda v: 0 < v <= 16)
        m2 = check_real("combined", "m2", m2, "in [0, pi) radians", lambda v: 0 <= v < math.pi)
        m3 = check_real("combined", "m3", m3, "in [0, 2) (cosine margin)", lambda v: 0 <= v < 2)
        grad_mode = check_grad_mode("combined", grad_mode)
        if grad_mode == "arcface_torch" and m1 != 1.0:
            raise ValueError(f"combined: grad_mode='arcface_torch' needs m1=1 (arcface_torch refuses other m1), "
                             f"got m1={m1}")
        if grad_mode == "arcface_torch" and m3 > 0 and m2 > 0:
            raise ValueError(f"combined: with m3 > 0 arcface_torch ignores m2 (it applies only the CosFace margin m3); "
                             f"set m2=0 to reproduce it, got m2={m2}, m3={m3}")
        super().__init__(embedding_size, num_classes)
        self.m1, self.m2, self.m3, self.s, self.grad_mode = m1, m2, m3, float(s), grad_mode
        theta_max = (math.pi - self.m2) / self.m1
        self.threshold = math.cos(theta_max) if theta_max < math.pi else -math.inf
        self.mm = max((math.pi - theta_max) * math.sin(theta_max), 1.0 + math.cos(theta_max))

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        cos_y = gather_target(cos, labels)
        if self.grad_mode == "arcface_torch":  # m1 = 1 and (m2 = 0 or m3 = 0), checked above
            target = (arc_margin_straight_through(cos_y, self.m2) if self.m2 > 0 else cos_y) - self.m3
            return put_target(cos, labels, target) * self.s
        theta = torch.atan2(safe_sin(cos_y), cos_y)
        target = torch.where(cos_y > self.threshold, torch.cos(self.m1 * theta + self.m2), cos_y - self.mm) - self.m3
        return put_target(cos, labels, target) * self.s

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.s}, "
                f"grad_mode={self.grad_mode!r}")
