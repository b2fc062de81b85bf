"""Update the weights or skip the step: the end of every optimizer step.

A step whose loss or gradient norm (or lr) is not finite is skipped: no update, weights,
momentum and buffers (BatchNorm statistics, head counters) as before it; the learning-rate
schedule still advances (the step, its data and its flips are consumed, so a resumed run and an
uninterrupted one stay on the same schedule). Under fp16 loss scaling an overflowing gradient is
GradScaler's to skip (it lowers the scale; engine/step.py ``non_finite``). The EMA of the backbone
follows only the steps that updated the weights.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch
import torch.nn as nn

from engine import step as steps
from engine.distributed import DistInfo
from engine.ema import BackboneEMA
from engine.objective import Objective
from engine.optim import base_lr, optimizer_params


class GuardedUpdate:
    """:meth:`begin` before a step's backward passes, :meth:`finish` after them: update or skip.

    ``model`` is the live backbone (what the EMA averages); ``scaler`` scales the losses the
    caller backpropagates, ``use_scaler`` says whether it does (fp16 on CUDA). ``grad_clip`` > 0
    clips the whole gradient's norm (sharded parts summed over ranks).
    """

    def __init__(self, model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, use_scaler: bool,
                 ema: BackboneEMA | None, grad_clip: float, dist: DistInfo, device: torch.device) -> None:
        self.model, self.objective, self.optimizer, self.scheduler = model, objective, optimizer, scheduler
        self.scaler, self.use_scaler, self.ema = scaler, use_scaler, ema
        self.grad_clip, self.dist, self.device = grad_clip, dist, device
        self._buffers = [b for m in (model, objective) for b in m.buffers()]
        self._buffer_copy = [b.detach().clone() for b in self._buffers]

    def begin(self) -> None:
        """Clear the gradients and keep the buffers the forward passes are about to change."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers:
            steps.copy_all(self._buffer_copy, self._buffers)

    def finish(self, loss: torch.Tensor) -> Tuple[str | None, float]:
        """(why the step was skipped, or None when it updated the weights; the step's base lr).

        ``loss`` is the step's mean loss (on the device); the verdict is the same on every rank.
        The scheduler advances either way.
        """
        sharded = self.objective.sharded_parameters()
        if self.use_scaler:
            steps.agree_on_overflow(sharded, self.dist, self.device)
        self.scaler.unscale_(self.optimizer)  # (a no-op without loss scaling) the norm in true units
        norm = steps.clip_gradients(optimizer_params(self.optimizer), sharded, self.grad_clip, self.device)
        lr = base_lr(self.optimizer)
        bad = steps.non_finite(loss, norm, lr, self.use_scaler, self.dist, self.device)
        if bad is None:
            self.scaler.step(self.optimizer)
        elif self._buffers:
            steps.copy_all(self._buffers, self._buffer_copy)
        scale = self.scaler.get_scale() if self.ema is not None and self.use_scaler else 0.0
        self.scaler.update()  # after a skipped step too: unscale_ recorded its overflow check
        if self.ema is not None and bad is None and self.scaler.get_scale() >= scale:
            self.ema.update(self.model)  # (a lower loss scale: GradScaler skipped the step on an overflow)
        with warnings.catch_warnings():  # a skipped first step is not the misuse torch warns about
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return bad, lr
