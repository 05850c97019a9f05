"""One small registry class; each kind (losses, miners, data sets, backbones) has one instance.

Configs name components by registry key; ``build(name, **kwargs)`` checks the keyword arguments against
the constructor's signature so that a misspelt hyper-parameter is an error that lists the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from deepmetric.errors import ConfigError, UnknownNameError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps snake_case keys to constructors (classes or factory functions)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@LOSSES.register("multi_similarity")``."""
        if name != name.lower() or " " in name or "-" in name:
            raise ValueError(f"registry keys are snake_case, got {name!r}")

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def available(self) -> list[str]:
        """Sorted registry keys."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``; an error listing the valid keys otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{suggest(name, self._entries)} "
                f"Available: {', '.join(self.available())}"
            ) from None

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the constructor accepts (``self`` and ``*args`` excluded)."""
        sig = inspect.signature(self.get(name))
        return {
            k: p
            for k, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming any keyword the constructor of ``name`` does not take."""
        ctor = self.get(name)
        params = inspect.signature(ctor).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return
        valid = self.parameters(name)
        for key in kwargs:
            if key not in valid:
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {key!r}.{suggest(key, valid)} "
                    f"Valid parameters: {', '.join(valid) or '(none)'}"
                )

    def build(self, name: str, **kwargs: Any) -> T:
        """Construct ``name`` with ``kwargs`` after checking the keyword names."""
        self.check_kwargs(name, kwargs)
        return self.get(name)(**kwargs)

    def build_in_context(self, name: str, context: dict[str, Any], **kwargs: Any) -> T:
        """:meth:`build` with, in addition, each ``context`` keyword (values the run knows, e.g.
        ``num_classes``) that the constructor of ``name`` takes and ``kwargs`` does not give."""
        params = self.parameters(name)
        return self.build(name, **{**{k: v for k, v in context.items() if k in params}, **kwargs})
