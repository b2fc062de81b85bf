"""Softmax cross-entropy and focal loss over head logits (B, C) and int64 labels (B,)."""

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
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

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
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        if self.reduction == "batch":
            ce = ce.mean()
        if self.gamma == 0:
            return ce.mean()
        # 1 - p_t = -expm1(-CE): accurate for confident samples; floored so gamma < 1 keeps a finite gradient
        weight = (-torch.expm1(-ce)).clamp(min=1e-12) ** self.gamma
        return (weight * ce).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}"
