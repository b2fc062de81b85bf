"""MagFace (Meng et al., CVPR 2021): the feature norm becomes a quality score.

The ArcFace margin grows linearly with the feature magnitude a, and a regulariser
g(a) = 1/a + a/u_a^2 (minimum at a = u_a) rewards large norms; together they push
confident samples to large norms and ambiguous ones towards the centre.
"""

from __future__ import annotations

import math

from torch import Tensor

from .arcface import arc_margin
from .base import MarginHead, check_bool, check_positive, check_real, gather_target, put_target, register


@register("magface")
class MagFace(MarginHead):
    """Target s*cos(theta_y + m(a)), others s*cos; extra_loss lambda_g * mean(g(a)).

    a = clamp(||x||, l_a, u_a) (gradient flows through a inside the range: the margin
    itself pulls on the norm), m(a) = (u_m - l_m)/(u_a - l_a) * (a - l_a) + l_m, and
    g(a) = 1/a + a/u_a^2 on the same clamped a.

    ``easy_margin`` (default True, as the official ``MagLinear`` and both of its model
    builders): the margin applies only where cos(theta_y) > 0, the target stays cos(theta_y)
    elsewhere. False: ArcFace's fallback with the per-sample margin, cos - m(a)*sin(m(a))
    where cos <= cos(pi - m(a)), which keeps the target decreasing in theta (the official
    code's non-easy branch). Select with ``--head-kwargs '{"easy_margin": false}'``.

    Ranges: s, l_a > 0, u_a > l_a, 0 <= l_m <= u_m < pi radians, lambda_g >= 0, all finite.

    Sharded softmax: margin and regulariser depend only on each row's own norm; the
    regulariser is a function of the (gathered) embeddings, so add it once, not per shard.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 20.0,
                 easy_margin: bool = True) -> None:
        check_positive("magface", s=s, l_a=l_a)
        u_a = check_real("magface", "u_a", u_a, f"> l_a ({l_a})", lambda v: v > l_a)
        l_m = check_real("magface", "l_m", l_m, "in [0, pi) radians", lambda v: 0 <= v < math.pi)
        u_m = check_real("magface", "u_m", u_m, f"in [l_m ({l_m}), pi) radians", lambda v: l_m <= v < math.pi)
        lambda_g = check_real("magface", "lambda_g", lambda_g, ">= 0", lambda v: v >= 0)
        easy_margin = check_bool("magface", "easy_margin", easy_margin)
        super().__init__(embedding_size, num_classes)
        self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = (float(v) for v in
                                                                         (s, l_a, u_a, l_m, u_m, lambda_g))
        self.easy_margin = easy_margin

    def margin(self, norms: Tensor) -> Tensor:
        """Per-sample margin m(a) in radians, (B, 1)."""
        a = norms.reshape(-1, 1).clamp(self.l_a, self.u_a)
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        target = arc_margin(gather_target(cos, labels), self.margin(norms.to(cos.dtype)), self.easy_margin)
        return put_target(cos, labels, target) * self.s

    def extra_loss(self, norms: Tensor) -> Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (1.0 / a + a / self.u_a ** 2).mean()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
                f"u_m={self.u_m}, lambda_g={self.lambda_g}, easy_margin={self.easy_margin}")
