"""The registry of built-in reward functions and loading a user's reward function by dotted path.

A reward function follows TRL's convention: ``fn(prompts, completions, **columns) -> list[float | None]``
where ``prompts`` and ``completions`` are lists of N strings and each column is the dataset rows' field
as a list of N values (e.g. ``answer=[...]``). ``None`` means "no score for this completion" (e.g. no
gold answer), not a failure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lit_gcpo.algorithms.registry import Registry

RewardFn = Callable[..., list[Any]]
"""``fn(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]``."""

REWARDS: Registry[RewardFn] = Registry("reward function")
"""Built-in reward functions by name (``math_accuracy``, ``math_accuracy_final``, ``format``, ``qa_exact_match``,
``qa_f1``)."""


def reads_gold(fn: RewardFn) -> RewardFn:
    """Marks a reward function that reads a row's gold answer (``answer``, ``gold``, ...): label-free training
    (``data.label_free``) refuses it. Mark your own such functions too, to have them refused there."""
    fn.reads_gold = True  # type: ignore[attr-defined]
    return fn


def needs_gold(name: Any) -> bool:
    """Whether the reward ``name`` (built-in or dotted path, loaded here) is marked with ``reads_gold``; a
    ``data.rewards`` entry that is not a name (a ``RewardModel``, or its ``class_path`` while parsing) reads
    none."""
    return isinstance(name, str) and bool(getattr(load_reward(name), "reads_gold", False))


def import_object(path: str) -> Any:
    """The object at ``pkg.module:attr`` or ``pkg.module.attr``; errors name the path and what failed."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"reward {path!r} is neither a built-in name nor a dotted path "
            f"('pkg.module:function' or 'pkg.module.function')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({error})") from error
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def load_reward(name: str) -> RewardFn:
    """A built-in reward by registry name, else a user function by dotted path.

    Raises ``ValueError`` naming ``name`` (and the built-in names) when it is neither, or when the path
    does not lead to a callable.
    """
    if name in REWARDS:
        return REWARDS.get(name)
    if "." not in name and ":" not in name:
        REWARDS.get(name)  # raises, listing the built-in names
    fn = import_object(name)
    if not callable(fn):
        raise ValueError(f"reward {name!r} is a {type(fn).__name__}, not a callable")
    return fn
