"""Margin heads: one registry, one surface (:class:`heads.base.MarginHead`).

    from heads import build, names
    head = build("arcface", embedding_size=512, num_classes=85742, s=64.0, m=0.5)
    logits, extra_loss = head(embeddings, labels)   # HeadOutput; extra_loss may be None

Adding a head means subclassing :class:`MarginHead` in its own file, decorating it
with ``@register("name")`` and importing that file below.
"""

from __future__ import annotations

import inspect
from typing import Any, List

from .base import HEADS, HeadOutput, MarginHead, register

# head modules register themselves on import
from . import adaface, arcface, cosface, curricularface, elasticface, magface, sphereface  # noqa: E402,F401  isort: skip
from .arcface import COMBINED_PRESETS  # noqa: E402  isort: skip


def params(name: str) -> dict[str, Any]:
    """The tunable parameters of head ``name`` and their defaults."""
    sig = inspect.signature(HEADS.get(name))
    return {k: p.default for k, p in sig.parameters.items() if k not in ("embedding_size", "num_classes")}


def build(name: str, embedding_size: int, num_classes: int, **kwargs: Any) -> MarginHead:
    """Build head ``name``; unknown parameters raise a TypeError naming the head and the valid ones."""
    valid = params(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"head {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))} "
                        f"(valid: {', '.join(valid) or 'none'})")
    return HEADS.build(name, embedding_size, num_classes, **kwargs)


def names() -> List[str]:
    """All registered head names and aliases, sorted."""
    return HEADS.names()


__all__ = ["COMBINED_PRESETS", "HEADS", "HeadOutput", "MarginHead", "build", "names", "params", "register"]
