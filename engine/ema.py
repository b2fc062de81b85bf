"""An exponential moving average of the backbone's weights (``--ema-decay``).

After every optimizer step that updated the weights (a skipped non-finite step does not count),
each floating-point parameter follows ``ema <- decay * ema + (1 - decay) * weight``; buffers
(BatchNorm running statistics, counters) are copied as they are, so the average is a model that
runs like the live one. The average starts from the weights at construction (or from the
checkpoint). It is kept in the checkpoint (exact resume), written as backbone_ema.pt in the
format of backbone.pt, and evaluated beside the live weights.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn as nn


class BackboneEMA:
    """The averaged copy of ``model`` (``module``: same class and layout, eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r} is not in (0, 1)")
        self.decay = float(decay)
        self.updates = 0  # optimizer steps averaged in
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights (call after each optimizer step that was not skipped)."""
        ema = [p for p in self.module.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)  # ema + (1 - decay) * (live - ema)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state.get("updates", 0))


def ema_summary(report: Mapping[str, Any], step: int, decay: float) -> Tuple[Dict[str, Any], str]:
    """(history entry, log line) of a verification report of the EMA weights."""
    results = report.get("results", {})
    acc = report.get("mean_accuracy", float("nan"))
    per_target = {k: v["accuracy"] for k, v in results.items()}
    line = (f"step {step}: EMA weights (decay {decay:g}) verification "
            + ", ".join(f"{k} {100 * a:.2f}" for k, a in per_target.items()) + f" | mean {100 * acc:.2f}%")
    return {"step": step, "mean_accuracy": acc, "accuracy": per_target}, line
