"""Learning-rate schedules as pure functions of the optimizer step.

Stepped per iteration (not per epoch), so warmup and decay are smooth and a
resumed run continues on the same curve. The config's warmup and milestones are in
epochs; :func:`build_scheduler` turns them into steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Sequence

import torch

from config import Config
from utils.registry import Registry

SCHEDULES = Registry("lr schedule")


@SCHEDULES.register("constant")
def _constant(progress: float, **_: Any) -> float:
    return 1.0


@SCHEDULES.register("cosine")
def _cosine(progress: float, **_: Any) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("step")
def _step(progress: float, step: int = 0, milestones: Sequence[int] = (), gamma: float = 0.1, **_: Any) -> float:
    return gamma ** sum(step >= m for m in milestones)


@SCHEDULES.register("poly")
def _poly(progress: float, power: float = 2.0, **_: Any) -> float:
    return (1.0 - progress) ** power


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 2.0,
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warmup from ~0 over `warmup_steps`, then `kind` over the remaining
    steps. `milestones` (in steps) are used by kind 'step': lr *= gamma at each.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return SCHEDULES.get(kind)(progress, step=step, milestones=milestones, gamma=gamma, power=power)


def make_lr_lambda(**kwargs: float) -> Callable[[int], float]:
    """A closure for torch.optim.lr_scheduler.LambdaLR."""
    params: Dict[str, float] = dict(kwargs)
    return lambda step: lr_factor(step, **params)  # type: ignore[arg-type]


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg``'s schedule (--scheduler, --warmup-epochs, --milestones, --lr-gamma, --poly-power) over
    ``total_steps`` optimizer steps, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(
        total_steps=total_steps, warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
        kind=cfg.scheduler, milestones=[int(round(m * steps_per_epoch)) for m in cfg.milestones],
        gamma=cfg.lr_gamma, power=cfg.poly_power))
