"""A tiny name -> object registry shared by every variant family of the project.

Advantage modes, KL estimators, loss aggregations, advantage-weight families, reward functions and
rollout engines are all chosen by a string in the configuration. Each family owns one ``Registry``;
an unknown name raises a ``ValueError`` that lists the valid ones, so a typo in a YAML file fails at
start-up with the fix in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects (usually functions or classes) stored under unique names.

    Args:
        kind: what the entries are, used in error messages (e.g. ``"advantage mode"``).

    Example::

        KL_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("KL estimator")

        @KL_ESTIMATORS.register("k3")
        def _k3(log_ratio): ...

        KL_ESTIMATORS.get("k3")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator storing the decorated object under ``name``; the object is returned unchanged."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Store ``obj`` under ``name``; a name can be registered once only."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def remove(self, name: str) -> T:
        """Take ``name`` out (a plug-in or a test that registered it for a while); returns what it stored."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry called ``name``; raises ``ValueError`` listing the valid names when it is unknown."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
