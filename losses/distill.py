"""Feature-distillation losses: how far a student's embeddings are from a frozen teacher's.

    from losses.distill import build_distill
    d = build_distill("cosine")
    term = d(student_emb, teacher_emb)       # (B, D) and (B, D) -> scalar

One registry (DISTILL_LOSSES), separate from the classification losses: these take two
embedding batches, not logits and labels.

    "l2"      mean_i ||s_i - t_i||^2 on the raw (un-normalised) embeddings (FitNet-style feature
              regression): it pulls the student's direction AND norm to the teacher's. Its size
              follows the teacher's embedding norms (an IR-50's are ~20-30, so the term can be in
              the hundreds): pick --distill-weight accordingly (e.g. 0.01).
    "cosine"  mean_i (1 - cos(s_i, t_i)): the direction only, in [0, 2], whatever the norms.
              Verification compares normalised embeddings, so this is what matters at test time;
              the default.

Both need the same width: a 128-d student cannot be compared with a 512-d teacher without a
learned projection, which this module does not add (the caller refuses the mismatch).
Half-precision inputs are computed in float32; float64 inputs stay float64 (exactness tests).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.registry import Registry

DISTILL_LOSSES = Registry("distillation loss")


def _check(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both (B, D) of one shape, in at least float32."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"distillation compares (B, D) embeddings of one shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.to(dtype), teacher.to(dtype)


@DISTILL_LOSSES.register("l2", "mse")
class L2Distill(nn.Module):
    """mean over the batch of the squared Euclidean distance ||s - t||^2 (summed over the D dimensions)."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = _check(student, teacher)
        return (s - t).pow(2).sum(dim=1).mean()


@DISTILL_LOSSES.register("cosine", "cos")
class CosineDistill(nn.Module):
    """mean over the batch of 1 - cos(s, t); a zero vector counts as cosine 0 (eps 1e-12 in the norms)."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = _check(student, teacher)
        cos = (F.normalize(s, dim=1, eps=1e-12) * F.normalize(t, dim=1, eps=1e-12)).sum(dim=1)
        return (1.0 - cos).mean()


def build_distill(name: str) -> nn.Module:
    """The distillation loss registered as ``name`` (UnknownNameError with the valid names otherwise)."""
    return DISTILL_LOSSES.build(name)


def names() -> List[str]:
    """All registered distillation loss names and aliases, sorted."""
    return DISTILL_LOSSES.names()
