"""Classification losses over head logits: one registry.

    from losses import build
    criterion = build("focal", gamma=2.0)
    loss = criterion(logits, labels)

Adding a loss means registering an ``nn.Module`` class with ``@register("name")`` in its
own file and importing that file below.
"""

from __future__ import annotations

import inspect
from typing import Any, List

from torch import nn

from .base import LOSSES, register

# loss modules register themselves on import
from . import cross_entropy  # noqa: E402,F401  isort: skip


def params(name: str) -> dict[str, Any]:
    """The parameters of loss ``name`` and their defaults."""
    return {k: p.default for k, p in inspect.signature(LOSSES.get(name)).parameters.items()}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build loss ``name``; unknown parameters raise a TypeError naming the loss and the valid ones."""
    valid = params(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"loss {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))} "
                        f"(valid: {', '.join(valid) or 'none'})")
    return LOSSES.build(name, **kwargs)


def names() -> List[str]:
    """All registered loss names and aliases, sorted."""
    return LOSSES.names()


__all__ = ["LOSSES", "build", "names", "params", "register"]
