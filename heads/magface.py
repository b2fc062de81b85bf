"""MagFace (Meng et al., CVPR 2021): the feature norm becomes a quality score.

The ArcFace margin grows linearly with the feature magnitude a, and a regulariser
g(a) = 1/a + a/u_a^2 (minimum at a = u_a) rewards large norms; together they push
confident samples to large norms and ambiguous ones towards the centre.
"""

from __future__ import annotations

from torch import Tensor

from .arcface import arc_margin
from .base import MarginHead, check_positive, gather_target, put_target, register


@register("magface")
class MagFace(MarginHead):
    """Target s*cos(theta_y + m(a)), others s*cos; extra_loss lambda_g * mean(g(a)).

    a = clamp(||x||, l_a, u_a) (gradient flows through a inside the range: the margin
    itself pulls on the norm), m(a) = (u_m - l_m)/(u_a - l_a) * (a - l_a) + l_m, and the
    fallback is ArcFace's with the per-sample margin: cos - m(a)*sin(m(a)) where
    cos <= cos(pi - m(a)). g(a) = 1/a + a/u_a^2 on the same clamped a.

    Sharded softmax: margin and regulariser depend only on each row's own norm; the
    regulariser is a function of the (gathered) embeddings, so add it once, not per shard.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 20.0) -> None:
        check_positive("magface", s=s, l_a=l_a)
        if not u_a > l_a or not u_m >= l_m or lambda_g < 0:
            raise ValueError(f"magface: need 0 < l_a < u_a, l_m <= u_m and lambda_g >= 0, got l_a={l_a}, "
                             f"u_a={u_a}, l_m={l_m}, u_m={u_m}, lambda_g={lambda_g}")
        super().__init__(embedding_size, num_classes)
        self.s, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = (float(v) for v in
                                                                         (s, l_a, u_a, l_m, u_m, lambda_g))

    def margin(self, norms: Tensor) -> Tensor:
        """Per-sample margin m(a) in radians, (B, 1)."""
        a = norms.reshape(-1, 1).clamp(self.l_a, self.u_a)
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        target = arc_margin(gather_target(cos, labels), self.margin(norms.to(cos.dtype)))
        return put_target(cos, labels, target) * self.s

    def extra_loss(self, norms: Tensor) -> Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (1.0 / a + a / self.u_a ** 2).mean()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
                f"u_m={self.u_m}, lambda_g={self.lambda_g}")
