"""Additive cosine margin (CosFace / AM-Softmax) and the two margin-free baselines.

CosFace (Wang et al., CVPR 2018) and AM-Softmax (Wang et al., 2018) subtract m from
the target cosine. ``norm_softmax`` is the same with m = 0 (NormFace); ``softmax`` is a
plain linear classifier, kept as a baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import HeadOutput, MarginHead, check_bool, check_positive, check_real, gather_target, put_target, register


@register("cosface", "am_softmax")
class CosFace(MarginHead):
    """Target logit s*(cos(theta) - m), others s*cos(theta).

    ``m`` in [0, 2): cosines lie in [-1, 1], so at m >= 2 the target logit could never beat any
    other and the loss would carry no information. ``s`` > 0.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35) -> None:
        check_positive("cosface", s=s)
        m = check_real("cosface", "m", m, "in [0, 2) (cosine margin)", lambda v: 0.0 <= v < 2.0)
        super().__init__(embedding_size, num_classes)
        self.s, self.m = float(s), m

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        return put_target(cos, labels, gather_target(cos, labels) - self.m) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}"


@register("norm_softmax")
class NormSoftmax(MarginHead):
    """Every logit s*cos(theta): normalised features and weights, no margin."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0) -> None:
        check_positive("norm_softmax", s=s)
        super().__init__(embedding_size, num_classes)
        self.s = float(s)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        return cos * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}"


@register("softmax")
class Softmax(MarginHead):
    """Plain linear logits W x + b: nothing normalised, no margin.

    For this head :meth:`cosine` returns raw inner products x . W (not cosines) and
    :meth:`margin_logits` returns them unchanged; the bias is added in ``forward``
    only, so a sharded softmax over this head would have to add its bias slice itself.
    """

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True) -> None:
        bias = check_bool("softmax", "bias", bias)
        super().__init__(embedding_size, num_classes)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_classes)) if bias else None)

    def cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        return F.linear(embeddings, weight)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        return cos

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        out = super().forward(embeddings, labels)
        if self.bias is None:
            return out
        return out._replace(logits=out.logits + self.bias.to(out.logits.dtype))
