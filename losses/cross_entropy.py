"""Softmax cross-entropy and focal loss over head logits (B, C) and int64 labels (B,).

Both losses are functions of the per-sample cross-entropy CE_i = -log p_i,target (and,
for label smoothing, of the per-sample uniform term -mean_j log p_ij): ``forward``
computes those from dense logits and hands them to ``from_sample_ce``, which a
sharded softmax (``heads.partial_fc.PartialFC``) calls directly with the same terms
computed across shards, so both paths share one formula.

Precision: float16/bfloat16 logits are computed in float32; float32 and float64 logits keep
their dtype (a float64 model gives a float64 loss, which is how exactness is tested).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register


def at_least_float32(logits: Tensor) -> Tensor:
    """``logits`` in float32 if narrower (half precision), else unchanged (float32 or float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def check_number(loss: str, key: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if a finite real number with ``ok(value)``; TypeError/ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {key} must be a number {rule}, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{loss}: {key} must be a finite number {rule}, got {value!r}")
    return v


@register("cross_entropy", "ce", "softmax")
class CrossEntropy(nn.Module):
    """Mean cross-entropy; ``label_smoothing`` in [0, 1) mixes the one-hot target with uniform."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_number("cross_entropy", "label_smoothing", label_smoothing, "in [0, 1)",
                                            lambda v: 0.0 <= v < 1.0)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.label_smoothing == 0:
            return self.from_sample_ce(F.cross_entropy(at_least_float32(logits), labels, reduction="none"))
        logp = F.log_softmax(at_least_float32(logits), dim=1)
        return self.from_sample_ce(F.nll_loss(logp, labels, reduction="none"), -logp.mean(dim=1))

    def from_sample_ce(self, ce: Tensor, uniform_ce: Tensor | None = None) -> Tensor:
        """The loss from per-sample CE_i = -log p_i,target (B,) and, with label smoothing,
        uniform_ce_i = -mean_j log p_ij over the classes (B,): mean_i (1 - eps)*CE_i + eps*uniform_ce_i,
        F.cross_entropy's definition of ``label_smoothing``."""
        if self.label_smoothing == 0:
            return ce.mean()
        if uniform_ce is None:
            raise ValueError(f"cross_entropy: label_smoothing={self.label_smoothing} needs uniform_ce "
                             f"(-mean_j log p_ij per sample), got None")
        eps = self.label_smoothing
        return ((1.0 - eps) * ce + eps * uniform_ce).mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@register("focal")
class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017) on softmax logits.

    ``reduction='mean'`` (the correct form): with CE_i = -log p_t,i per sample,
    FL = mean_i (1 - p_t,i)^gamma * CE_i, so well-classified samples are down-weighted
    one by one. ``reduction='batch'`` reproduces the seed repositories' form, which
    applies the factor to the batch-mean CE: FL = (1 - exp(-CE_mean))^gamma * CE_mean; it
    only rescales the whole batch's loss and does not re-weight samples. gamma = 0 is CE
    in both forms.
    """

    def __init__(self, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        gamma = check_number("focal", "gamma", gamma, ">= 0", lambda v: v >= 0.0)
        if reduction not in ("mean", "batch"):
            raise ValueError(f"focal: reduction must be 'mean' or 'batch', got {reduction!r}")
        self.gamma, self.reduction = gamma, reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.from_sample_ce(F.cross_entropy(at_least_float32(logits), labels, reduction="none"))

    def from_sample_ce(self, ce: Tensor, uniform_ce: Tensor | None = None) -> Tensor:
        """The loss from per-sample CE_i = -log p_i,target (B,); ``uniform_ce`` is unused (no label smoothing)."""
        if self.reduction == "batch":
            ce = ce.mean()
        if self.gamma == 0:
            return ce.mean()
        # 1 - p_t = -expm1(-CE): accurate for confident samples; floored so gamma < 1 keeps a finite gradient
        weight = (-torch.expm1(-ce)).clamp(min=1e-12) ** self.gamma
        return (weight * ce).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}"
