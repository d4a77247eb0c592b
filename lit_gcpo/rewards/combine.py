"""Scoring a batch of completions with several reward functions, robust to failing or hanging ones.

Time bound (project's choice): each reward function gets ``timeout`` seconds for one batch call. The
functions of a batch run concurrently, each in its own daemon thread, so ``score`` returns within about
``max(timeout)`` seconds whatever the functions do. A function that raises, times out, or returns
something other than N scores yields ``None`` for all N completions of that batch; those completions
are counted in ``reward/<name>_failures`` and training goes on. A thread that hangs cannot be killed:
it is left running in the background, and once ``MAX_STUCK_CALLS`` calls of one function are still
running, that function is not called again until one returns (its scores count as failures), so a
function that always hangs does not pile up threads. Built-in math grading never hangs a thread: it
runs in a killable process (``lit_gcpo.rewards.sandbox``).

Combination (project's reading of "weighted sum of rewards" for partial failure): the total of a
completion is ``sum_i w_i * s_i`` over the components with a finite score; a component with no score
(``None``/NaN from the function, or a failure) contributes 0 and is counted; the total is NaN only when
no component has a score, which the advantage code excludes from its group statistics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_gcpo.rewards.loading import RewardFn, load_reward

log = logging.getLogger(__name__)

MAX_STUCK_CALLS = 2
"""Calls of one reward function that may still be running (timed out) before it is skipped."""


@dataclass
class RewardScores:
    """Scores of one batch of N completions.

    Attributes:
        total: weighted total, ``[N]`` float32; NaN where no component has a score.
        components: each function's scores by name, ``[N]`` float32; NaN = no score (None or failure).
        metrics: ``reward/<name>_failures`` (completions whose call failed), ``reward/<name>_none``
            (completions the function gave no score), ``time/reward_<name>_s``.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardTerm:
    """One weighted reward function; ``name`` keys its component and metrics."""

    name: str
    fn: RewardFn
    weight: float = 1.0


class _Call:
    """One reward-function call on a daemon thread; ``result``/``error`` are set when it returns."""

    def __init__(self, fn: RewardFn, prompts: list[str], completions: list[Any], columns: dict) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, prompts, completions, columns), daemon=True)

    def _run(self, fn: RewardFn, prompts: list[str], completions: list[Any], columns: dict) -> None:
        try:
            self.result = fn(prompts, completions, **columns)
        except BaseException as error:  # a user function may raise anything, including SystemExit
            self.error = error


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts -> column lists (a field a row lacks is ``None`` in that row)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def _as_score(value: Any) -> float:
    """A returned score as a float; None, NaN and non-numbers become NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _as_score(value.item())
    return math.nan


class RewardSet:
    """Several weighted reward functions scoring batches robustly (see the module docstring).

    Args:
        terms: the weighted reward functions; names must be unique.
        timeout: seconds each function may take for one batch call.
    """

    def __init__(self, terms: Sequence[RewardTerm], timeout: float = 10.0) -> None:
        if not terms:
            raise ValueError("a RewardSet needs at least one reward function")
        names = [t.name for t in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique, repeated: {duplicates}")
        for term in terms:
            if not math.isfinite(term.weight):
                raise ValueError(f"reward {term.name!r}: weight must be finite, got {term.weight}")
        if not timeout > 0:
            raise ValueError(f"reward timeout must be > 0 seconds, got {timeout}")
        self.terms = list(terms)
        self.timeout = float(timeout)
        self._running: dict[str, list[_Call]] = {t.name: [] for t in self.terms}

    @classmethod
    def from_names(
        cls, names: Sequence[str], weights: Sequence[float] | None = None, timeout: float = 10.0
    ) -> RewardSet:
        """Built-in names or dotted paths, with their weights (default 1 each)."""
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(names)} rewards")
        weights = list(weights) if weights is not None else [1.0] * len(names)
        return cls([RewardTerm(n, load_reward(n), float(w)) for n, w in zip(names, weights, strict=True)], timeout)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def score(
        self, prompts: Sequence[str], completions: Sequence[Any], rows: Sequence[Mapping[str, Any]]
    ) -> RewardScores:
        """Scores N completions; ``rows[i]`` is the dataset row of completion i (its fields are columns)."""
        n = len(completions)
        if len(prompts) != n or len(rows) != n:
            raise ValueError(f"score got {len(prompts)} prompts, {n} completions and {len(rows)} rows")
        columns = rows_to_columns(rows)
        prompts, completions = list(prompts), list(completions)
        start = time.monotonic()
        calls: dict[str, _Call | None] = {}
        for term in self.terms:
            self._running[term.name] = [c for c in self._running[term.name] if c.thread.is_alive()]
            if len(self._running[term.name]) >= MAX_STUCK_CALLS:
                calls[term.name] = None  # still stuck in earlier batches: do not start another thread
                continue
            call = _Call(term.fn, prompts, completions, {k: list(v) for k, v in columns.items()})
            call.thread.start()
            calls[term.name] = call

        components: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for term in self.terms:
            call = calls[term.name]
            if call is not None:
                call.thread.join(max(0.0, start + self.timeout - time.monotonic()))
            values, problem = self._collect(term.name, call, n)
            if problem is not None:
                log.warning("reward %r failed on a batch of %d completions: %s", term.name, n, problem)
            components[term.name] = torch.tensor(values, dtype=torch.float32)  # [N]
            metrics[f"reward/{term.name}_failures"] = float(n if problem is not None else 0)
            metrics[f"reward/{term.name}_none"] = float(sum(math.isnan(v) for v in values)) if problem is None else 0.0
            metrics[f"time/reward_{term.name}_s"] = time.monotonic() - start
        return RewardScores(self._combine(components, n), components, metrics)

    def _collect(self, name: str, call: _Call | None, n: int) -> tuple[list[float], str | None]:
        """The N scores of a finished call, or all-NaN and the reason the call failed."""
        failed = [math.nan] * n
        if call is None:
            return failed, f"{MAX_STUCK_CALLS} earlier calls are still running"
        if call.thread.is_alive():
            self._running[name].append(call)
            return failed, f"timed out after {self.timeout:g} s"
        if call.error is not None:
            return failed, f"raised {type(call.error).__name__}: {call.error}"
        result = call.result
        if isinstance(result, torch.Tensor):
            result = result.tolist()
        if not isinstance(result, (list, tuple)) or len(result) != n:
            size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            return failed, f"returned {size} instead of a list of {n} scores"
        return [_as_score(v) for v in result], None

    def _combine(self, components: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float32)  # [N]
        scored = torch.zeros(n, dtype=torch.bool)  # [N]
        for term in self.terms:
            values = components[term.name]  # [N]
            finite = torch.isfinite(values)  # [N]
            total += torch.where(finite, values * term.weight, torch.zeros_like(values))
            scored |= finite
        return torch.where(scored, total, torch.full_like(total, math.nan))  # [N]


CombinedReward = RewardSet
"""Alias: the weighted combination of several reward functions."""
