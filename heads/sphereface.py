"""SphereFace / A-Softmax (Liu et al., CVPR 2017): multiplicative angular margin m*theta.

Logits are ||x|| * cos(theta_j) with normalised class weights and un-normalised
features. The target uses psi(theta) = (-1)^k cos(m*theta) - 2k, k = floor(m*theta/pi),
a monotonic decreasing extension of cos(m*theta) to [0, pi]. Training starts close to
plain softmax and anneals towards psi through lambda, as in the reference Caffe layer
(``MarginInnerProductLayer``) and Face_Pytorch's ``SphereMarginProduct``:

    iter <- iter + 1                                   (first, so the first step has iter = 1)
    lambda = max(lambda_min, base * (1 + gamma * iter) ** -power)
    target = ||x|| * ((lambda * cos + psi) / (1 + lambda)) = ||x|| * ((psi - cos)/(1 + lambda) + cos)

With the defaults the first training step uses lambda = 1000/1.12 = 892.9, as theirs does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MarginHead, check_int, check_positive, check_real, gather_target, put_target, register

MAX_M = 10  # the paper and the Caffe layer use m in 1..4; cos(m*theta) is a degree-m polynomial


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

    ``iter`` (an int64 buffer, saved with the checkpoint) counts training calls of
    :meth:`margin_logits`. A training call first increments it, then uses lambda(iter), as
    the references do; an eval call leaves it and uses lambda(iter) too. So ``lambda_`` is
    the value the last training call used (lambda(0) = base before any). A resumed head
    continues the schedule exactly. In a sharded softmax every shard calls
    :meth:`margin_logits` once per step, so the counters stay equal without communication.

    Ranges: ``m`` an integer in 1..10, ``base`` > 0, ``gamma``, ``power``, ``lambda_min`` >= 0,
    all finite.
    """

    def __init__(self, embedding_size: int, num_classes: int, m: int = 4, base: float = 1000.0,
                 gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0) -> None:
        m = check_int("sphereface", "m", m, 1, MAX_M)
        check_positive("sphereface", base=base)
        gamma, power, lambda_min = (check_real("sphereface", key, value, ">= 0", lambda v: v >= 0)
                                    for key, value in (("gamma", gamma), ("power", power), ("lambda_min", lambda_min)))
        super().__init__(embedding_size, num_classes)
        self.m, self.base, self.gamma, self.power, self.lambda_min = m, float(base), gamma, power, lambda_min
        self.register_buffer("iter", torch.zeros((), dtype=torch.int64))

    @property
    def lambda_(self) -> float:
        """lambda(iter): what the last training call used and what an eval call uses."""
        return max(self.lambda_min, self.base * (1.0 + self.gamma * int(self.iter)) ** -self.power)

    def margin_logits(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.iter += 1
        # tensor arithmetic (no .item()) so a CUDA step does not wait on the host
        lam = (self.base * (1.0 + self.gamma * self.iter.to(cos.dtype)) ** -self.power).clamp(min=self.lambda_min)
        cos_y = gather_target(cos, labels)
        with torch.no_grad():
            k = torch.floor(self.m * torch.acos(cos_y) / math.pi).clamp(0, self.m)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        psi = sign * chebyshev(cos_y, self.m) - 2.0 * k
        target = (psi - cos_y) / (1.0 + lam) + cos_y
        return put_target(cos, labels, target) * norms

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
                f"lambda_min={self.lambda_min}")
