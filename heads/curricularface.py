"""CurricularFace (Huang et al., CVPR 2020): ArcFace target plus adaptively re-weighted hard negatives.

Non-target cosines that beat the margined target, cos_j > cos(theta_y + m), are hard
negatives and become cos_j * (t + cos_j); t is an EMA of the mean target cosine, so
hard negatives are down-weighted early (t ~ 0) and emphasised as training converges.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .arcface import arc_margin, safe_sin
from .base import MarginHead, check_positive, check_real, gather_target, put_target, register


@register("curricularface")
class CurricularFace(MarginHead):
    """Target s*cos(theta_y + m) with ArcFace's fallback (cos - m*sin(m) where cos <= cos(pi - m));
    hard negatives s*cos_j*(t + cos_j); other logits s*cos_j.

    As in the official code, the hard-negative test uses cos(theta_y + m) itself (the
    identity cos*cos(m) - sin*sin(m), no fallback), and t is updated *before* it
    re-weights, in training only: t <- momentum*t + (1 - momentum)*mean(cos_y), no gradient.

    Sharded softmax: the hard-negative test needs every row's target cosine, which a
    shard without the row's class does not have. The caller then passes ``target_cos``
    (B,), each row's target cosine (e.g. all-reduce SUM of the gathered target cosine,
    zero where the local label is -1); with it, the masks and t are identical on every
    shard. Without it, rows with label -1 get no re-weighting (scaling only) and t is the
    mean over the rows whose class is present.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 momentum: float = 0.99) -> None:
        check_positive("curricularface", s=s)
        m = check_real("curricularface", "m", m, "in [0, pi) radians", lambda v: 0.0 <= v < math.pi)
        momentum = check_real("curricularface", "momentum", momentum, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        super().__init__(embedding_size, num_classes)
        self.s, self.m, self.momentum = float(s), m, momentum
        self.register_buffer("t", torch.zeros(()))

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor, target_cos: Tensor | None = None) -> Tensor:
        cos_y = gather_target(cos, labels)
        with torch.no_grad():
            if target_cos is None:
                known = (labels >= 0).unsqueeze(1)
                ref = cos_y.detach()
            else:
                known = torch.ones_like(cos_y, dtype=torch.bool)
                ref = target_cos.detach().reshape(-1, 1).to(cos.dtype)
            if self.training:
                count = known.sum()
                mean = ((ref * known).sum() / count.clamp(min=1)).to(self.t.dtype)
                updated = self.momentum * self.t + (1.0 - self.momentum) * mean
                self.t.copy_(torch.where(count > 0, updated, self.t))  # a shard with no targets keeps t
            ref_m = ref * math.cos(self.m) - safe_sin(ref) * math.sin(self.m)
            hard = (cos > ref_m) & known
        t = self.t.to(cos.dtype)
        logits = torch.where(hard, cos * (t + cos), cos)
        logits = put_target(logits, labels, arc_margin(cos_y, self.m))
        return logits * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, momentum={self.momentum}"
