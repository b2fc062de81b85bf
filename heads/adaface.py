"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality through the feature norm.

High-norm (good quality) samples get an angular margin like ArcFace, low-norm ones an
additive margin like CosFace, so hard but recognisable samples are emphasised and
unrecognisable ones are not. The feature norm is standardised with EMA batch statistics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MarginHead, check_positive, check_real, gather_target, put_target, register


@register("adaface")
class AdaFace(MarginHead):
    """Target s*(cos(clip(theta_y + g_angular, eps, pi - eps)) - g_add), others s*cos.

    With a = clamp(||x||, 0.001, 100) (no gradient) and, in training, the EMA update first

        batch_mean <- t_alpha * mean(a) + (1 - t_alpha) * batch_mean      (init 20)
        batch_std  <- t_alpha * std(a)  + (1 - t_alpha) * batch_std       (init 100, unbiased std)

    margin_scaler = clamp((a - batch_mean) / (batch_std + eps) * h, -1, 1),
    g_angular = -m * margin_scaler, g_add = m + m * margin_scaler, eps = 1e-3, and
    theta_y = arccos(clamp(cos_y, -1 + eps, 1 - eps)) -- the official formulation. Two
    deliberate differences from the official code: non-target logits are s*cos unclamped
    (the official clamps every cosine to [-1 + eps, 1 - eps]), and the statistics are only
    updated in training mode (and the std only for batches of two or more).

    Sharded softmax: the statistics need only the norms, which every shard has for the
    whole (gathered) batch, so the buffers stay identical on all shards. Under plain data
    parallel each rank sees its own batch; DDP's buffer broadcast then keeps rank 0's.

    Ranges: s > 0; m in [0, 1] (the additive part g_add reaches 2m, the whole cosine range at
    m = 1); h >= 0; t_alpha in [0, 1]; all finite.
    """

    eps = 1e-3

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01) -> None:
        check_positive("adaface", s=s)
        m = check_real("adaface", "m", m, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        h = check_real("adaface", "h", h, ">= 0", lambda v: v >= 0.0)
        t_alpha = check_real("adaface", "t_alpha", t_alpha, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        super().__init__(embedding_size, num_classes)
        self.s, self.m, self.h, self.t_alpha = float(s), m, h, t_alpha
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        a = norms.detach().clamp(0.001, 100.0).reshape(-1, 1)
        if self.training:
            with torch.no_grad():
                alpha = self.t_alpha
                self.batch_mean.mul_(1 - alpha).add_(alpha * a.mean().to(self.batch_mean.dtype))
                if a.shape[0] > 1:
                    self.batch_std.mul_(1 - alpha).add_(alpha * a.std().to(self.batch_std.dtype))
        mean, std = self.batch_mean.to(cos.dtype), self.batch_std.to(cos.dtype)
        scaler = ((a.to(cos.dtype) - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)
        g_angular = -self.m * scaler
        g_add = self.m + self.m * scaler
        theta = torch.acos(gather_target(cos, labels).clamp(-1.0 + self.eps, 1.0 - self.eps))
        target = torch.cos((theta + g_angular).clamp(self.eps, math.pi - self.eps)) - g_add
        return put_target(cos, labels, target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
