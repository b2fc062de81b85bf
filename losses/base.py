"""The loss registry: each entry builds an ``nn.Module`` with ``forward(logits, labels) -> scalar``."""

from __future__ import annotations

from utils.registry import Registry

LOSSES = Registry("loss")
register = LOSSES.register
