"""SphereFace / A-Softmax (Liu et al., CVPR 2017): multiplicative angular margin m*theta.

Logits are ||x|| * cos(theta_j) with normalised class weights and un-normalised
features. The target uses psi(theta) = (-1)^k cos(m*theta) - 2k, k = floor(m*theta/pi),
a monotonic decreasing extension of cos(m*theta) to [0, pi]. Training starts close to
plain softmax and anneals towards psi through lambda, as in the reference Caffe layer:

    lambda = max(lambda_min, base * (1 + gamma * iter) ** -power)
    target = ||x|| * ((lambda * cos + psi) / (1 + lambda)) = ||x|| * ((psi - cos)/(1 + lambda) + cos)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MarginHead, check_positive, gather_target, put_target, register


def chebyshev(cos: Tensor, m: int) -> Tensor:
    """cos(m*theta) as the Chebyshev polynomial T_m(cos theta): a polynomial, so finite gradients at +-1."""
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return cur


@register("sphereface", "a_softmax")
class SphereFace(MarginHead):
    """A-Softmax with the annealed lambda schedule; rows with label -1 get ||x|| * cos only.

    ``iter`` (a buffer, saved with the checkpoint) counts training calls of
    :meth:`margin_logits`; the call at ``iter`` = i uses lambda(i), then increments it.
    In a sharded softmax every shard calls :meth:`margin_logits` once per step, so the
    counters stay equal without communication. ``lambda_`` is the value the next call uses.
    """

    def __init__(self, embedding_size: int, num_classes: int, m: int = 4, base: float = 1000.0,
                 gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0) -> None:
        if int(m) != m or m < 1:
            raise ValueError(f"sphereface: m must be a positive integer (multiplicative margin), got {m}")
        check_positive("sphereface", base=base)
        if gamma < 0 or power < 0 or lambda_min < 0:
            raise ValueError(f"sphereface: gamma, power and lambda_min must be >= 0, "
                             f"got {gamma}, {power}, {lambda_min}")
        super().__init__(embedding_size, num_classes)
        self.m, self.base, self.gamma, self.power, self.lambda_min = int(m), float(base), float(gamma), \
            float(power), float(lambda_min)
        self.register_buffer("iter", torch.zeros((), dtype=torch.int64))

    @property
    def lambda_(self) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * int(self.iter)) ** -self.power)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        # tensor arithmetic (no .item()) so a CUDA step does not wait on the host
        lam = (self.base * (1.0 + self.gamma * self.iter.to(cos.dtype)) ** -self.power).clamp(min=self.lambda_min)
        cos_y = gather_target(cos, labels)
        with torch.no_grad():
            k = torch.floor(self.m * torch.acos(cos_y) / math.pi).clamp(0, self.m)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        psi = sign * chebyshev(cos_y, self.m) - 2.0 * k
        target = (psi - cos_y) / (1.0 + lam) + cos_y
        if self.training:
            with torch.no_grad():
                self.iter += 1
        return put_target(cos, labels, target) * norms

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
                f"lambda_min={self.lambda_min}")
