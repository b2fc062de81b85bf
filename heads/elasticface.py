"""ElasticFace (Boutros et al., CVPRW 2022): margins drawn per sample from N(m, sigma^2).

A random margin instead of a fixed one relaxes the fixed decision boundary; in eval
mode the margin is the mean m, so logits are deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .arcface import arc_margin
from .base import MarginHead, check_positive, check_real, gather_target, put_target, register


class _Elastic(MarginHead):
    """Shared margin sampling. Sharded softmax: every shard draws margins for all rows and
    only the shard holding a row's class uses its draw, so shards need not agree on draws."""

    def __init__(self, name: str, embedding_size: int, num_classes: int, s: float, m: float, sigma: float,
                 generator: torch.Generator | None, m_rule: str, m_high: float) -> None:
        check_positive(name, s=s)
        m = check_real(name, "m", m, m_rule, lambda v: 0.0 <= v < m_high)
        sigma = check_real(name, "sigma", sigma, f"in [0, {m_high:.4g})", lambda v: 0.0 <= v < m_high)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        super().__init__(embedding_size, num_classes)
        self.s, self.m, self.sigma = float(s), m, sigma
        self.generator = generator  # not state: reproducibility for tests and ablations only

    def sample_margin(self, rows: int, like: Tensor) -> Tensor:
        """(rows, 1) margins: N(m, sigma^2) draws in training, m in eval."""
        if not self.training or self.sigma == 0:
            return torch.full((rows, 1), self.m, dtype=like.dtype, device=like.device)
        device = self.generator.device if self.generator is not None else like.device
        noise = torch.randn(rows, 1, generator=self.generator, device=device, dtype=like.dtype)
        return (self.m + self.sigma * noise).to(like.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m={self.m}, sigma={self.sigma}"


@register("elasticface_arc")
class ElasticArcFace(_Elastic):
    """Target s*cos(theta_y + m_i), m_i ~ N(m, sigma^2), with ArcFace's fallback per sample
    (cos - m_i*sin(m_i) where cos <= cos(pi - m_i)); the official code has no fallback.
    Ranges: s > 0, m in [0, pi) radians, sigma in [0, pi)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.05,
                 generator: torch.Generator | None = None) -> None:
        super().__init__("elasticface_arc", embedding_size, num_classes, s, m, sigma, generator,
                         "in [0, pi) radians", math.pi)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        target = arc_margin(gather_target(cos, labels), self.sample_margin(cos.shape[0], cos))
        return put_target(cos, labels, target) * self.s


@register("elasticface_cos")
class ElasticCosFace(_Elastic):
    """Target s*(cos(theta_y) - m_i), m_i ~ N(m, sigma^2). Ranges: s > 0, m and sigma in [0, 2)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35,
                 sigma: float = 0.05, generator: torch.Generator | None = None) -> None:
        super().__init__("elasticface_cos", embedding_size, num_classes, s, m, sigma, generator,
                         "in [0, 2) (cosine margin)", 2.0)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        target = gather_target(cos, labels) - self.sample_margin(cos.shape[0], cos)
        return put_target(cos, labels, target) * self.s
