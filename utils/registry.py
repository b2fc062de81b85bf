"""A tiny name -> builder registry, one per family (backbones, heads, losses).

Adding a model means decorating its builder in its own file; nothing else in
the tree changes (timm's pattern, without the machinery).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterator, TypeVar

from utils.errors import UserError

T = TypeVar("T", bound=Callable[..., Any])


class UnknownNameError(UserError, KeyError):
    """A name not in a registry; str() is the plain one-line message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """Maps lower-case names to builder callables."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` (defaults to the function name)."""

        def deco(fn: T) -> T:
            for key in (name or fn.__name__, *aliases):
                key = key.lower()
                if key in self._items:
                    raise KeyError(f"{self.kind} {key!r} is registered twice")
                self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        key = name.lower()
        if key not in self._items:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return self._items[key]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """One-line error naming the bad value and the closest valid one."""
    close = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})"
