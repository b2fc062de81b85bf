"""Softmax cross-entropy and focal loss over head logits (B, C) and int64 labels (B,).

Both losses are functions of the per-sample cross-entropy CE_i = -log p_i,target (and,
for label smoothing, of the per-sample uniform term -mean_j log p_ij): ``forward``
computes those from dense logits and hands them to ``from_sample_ce``, which a
sharded softmax (``heads.partial_fc.PartialFC``) calls directly with the same terms
computed across shards, so both paths share one formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register


@register("cross_entropy", "ce", "softmax")
class CrossEntropy(nn.Module):
    """Mean cross-entropy; ``label_smoothing`` in [0, 1) mixes the one-hot target with uniform."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.label_smoothing == 0:
            return self.from_sample_ce(F.cross_entropy(logits.float(), labels, reduction="none"))
        logp = F.log_softmax(logits.float(), dim=1)
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
        if gamma < 0:
            raise ValueError(f"focal: gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "batch"):
            raise ValueError(f"focal: reduction must be 'mean' or 'batch', got {reduction!r}")
        self.gamma, self.reduction = float(gamma), reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.from_sample_ce(F.cross_entropy(logits.float(), labels, reduction="none"))

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
