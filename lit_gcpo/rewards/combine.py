"""Scoring a batch of completions with several reward functions, robust to failing, hanging or unusable ones.

Time bound (project's choice): each reward function gets ``timeout`` seconds for one batch call, and the
functions of a batch run concurrently, so ``score`` returns within about ``max(timeout)`` seconds whatever
they do. A user's function (loaded by dotted path) runs in its own child process (``ProcessReward``): a call
past the timeout kills that process and a fresh one serves the next batch, so a function stuck in a CPU loop
costs one timeout per batch, never the trainer's CPU; a process that dies during a call (``os._exit``, the
out-of-memory killer) is replaced at once and reported with its exit code or signal. Timed-out calls are counted in
``reward/<name>_timeouts`` and logged. Built-in rewards and ``RewardTerm``s built from a plain callable run in
daemon threads; a thread that hangs cannot be killed, so once ``MAX_STUCK_CALLS`` calls of one function are
still running it is not called again until one returns (the built-in math grading itself runs in a killable
process, ``lit_gcpo.rewards.sandbox``). A learned reward model (``lit_gcpo.rewards.RewardModel``: trusted weights,
not user code) runs in the calling thread while the functions' threads run, without a timeout: an error in it stops
the run; its own counts (``truncated``) are logged as ``reward/<name>_<count>``.

A call that raises, times out or returns something other than N scores yields no score for all N
completions (``reward/<name>_failures``). Scores must be numbers or None:

- ``None`` is "no score for this completion" (e.g. no gold answer), counted in ``reward/<name>_none``;
- NaN, an infinity or a magnitude above ``MAX_ABS_SCORE`` is an unusable score: counted in
  ``reward/<name>_invalid``, logged with an example, and no score for that completion;
- any other type (a string, a list...) is a bug in the function: ``RewardError`` naming it and the value;
- a function with no usable score in ``max_unusable_batches`` batches in a row (it fails, times out or
  returns only unusable values on every call) stops the run with ``RewardError`` and its last problem; a
  batch it gives only None (rows without a gold answer, e.g. in ``lit-gcpo predict``) does not count;
- ``scored_batches`` / ``usable_batches`` count the batches scored and those where some completion got a
  total: the CLI fails a fit that ends without a single usable batch.

Combination (project's reading of "weighted sum of rewards" for partial failure): the total of a
completion is ``sum_i w_i * s_i`` over the components with a score; a component with no score contributes
0 and is counted; the total is NaN only when no component has a score, which the advantage code excludes
from its group statistics.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_gcpo.rewards.isolated import ProcessReward, RewardCallError, RewardCrashError, RewardTimeoutError
from lit_gcpo.rewards.loading import REWARDS, RewardFn, load_reward
from lit_gcpo.rewards.reward_model import RewardModel

log = logging.getLogger(__name__)

MAX_STUCK_CALLS = 2
"""Calls of one reward function that may still be running (timed out) before it is skipped."""

MAX_ABS_SCORE = 1e6
"""Scores beyond this magnitude are unusable (1e38 summed over a group overflows float32 statistics)."""

PROCESS_GRACE_S = 1.0
"""Extra seconds a process-isolated call gets to be killed and report its timeout."""


class RewardError(RuntimeError):
    """A reward function that cannot give the run a usable reward."""


@dataclass
class RewardScores:
    """Scores of one batch of N completions.

    Attributes:
        total: weighted total, ``[N]`` float32; NaN where no component has a score.
        components: each function's scores by name, ``[N]`` float32; NaN = no score (None or failure).
        metrics: ``reward/<name>_failures`` (completions whose call failed), ``reward/<name>_timeouts``
            (calls that timed out: 0 or 1), ``reward/<name>_none`` (completions given None),
            ``reward/<name>_invalid`` (completions given NaN, inf or a huge value), ``time/reward_<name>_s``.
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


def _as_score(value: Any) -> float | None:
    """A returned score as a float (possibly unusable: NaN, inf, huge); None for None; raises ``TypeError``
    for anything that is not a number."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    raise TypeError(type(value).__name__)


def _usable(score: float | None) -> bool:
    return score is not None and math.isfinite(score) and abs(score) <= MAX_ABS_SCORE


class RewardSet:
    """Several weighted reward functions scoring batches robustly (see the module docstring).

    Args:
        terms: the weighted reward functions; names must be unique.
        timeout: seconds each function may take for one batch call.
        max_unusable_batches: batches in a row without a usable score from one function before
            ``RewardError`` stops the run (0: never).
    """

    def __init__(self, terms: Sequence[RewardTerm], timeout: float = 10.0, max_unusable_batches: int = 10) -> None:
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
        if max_unusable_batches < 0:
            raise ValueError(f"max_unusable_batches must be >= 0, got {max_unusable_batches}")
        self.terms = list(terms)
        self.timeout = float(timeout)
        self.max_unusable_batches = max_unusable_batches
        self._running: dict[str, list[_Call]] = {t.name: [] for t in self.terms}
        self.timeouts: dict[str, int] = dict.fromkeys(names, 0)  # timed-out calls since creation
        self.scored_batches = self.usable_batches = 0  # batches scored / with a usable total for some completion
        self._unusable_streak: dict[str, int] = dict.fromkeys(names, 0)

    @classmethod
    def from_names(
        cls, names: Sequence[str | RewardModel], weights: Sequence[float] | None = None, timeout: float = 10.0
    ) -> RewardSet:
        """Built-in names, dotted paths or ``RewardModel``s (``data.rewards``), with their weights (default 1 each); a
        dotted path's function runs in its own process (loaded here first, so that a wrong path fails at once,
        naming it), a reward model in this one."""
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(names)} rewards")
        weights = list(weights) if weights is not None else [1.0] * len(names)
        terms = []
        for name, weight in zip(names, weights, strict=True):
            if isinstance(name, RewardModel):
                terms.append(RewardTerm(name.name, name, float(weight)))
                continue
            fn = load_reward(name)
            terms.append(RewardTerm(name, fn if name in REWARDS else ProcessReward(name, timeout), float(weight)))
        return cls(terms, timeout)

    @property
    def reward_models(self) -> list[RewardModel]:
        return [term.fn for term in self.terms if isinstance(term.fn, RewardModel)]

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
        for term in self.terms:
            if isinstance(term.fn, ProcessReward):
                term.fn.wait_ready()  # (re)starting a process is not part of a call's time bound
        start = time.monotonic()
        calls = self._start_calls(prompts, completions, columns)
        components: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for term in self.terms:
            name, call = term.name, calls[term.name]
            if call is not None and call.thread.ident is not None:  # a process-isolated call ends at its timeout
                grace = PROCESS_GRACE_S if isinstance(term.fn, ProcessReward) else 0.0
                call.thread.join(max(0.0, start + self.timeout + grace - time.monotonic()))
            values, failure, timed_out = self._collect(name, call, n)
            if timed_out:
                self.timeouts[name] += 1
                failure = f"{failure} ({self.timeouts[name]} timed-out calls so far)"
            if failure is not None:
                log.warning("reward %r failed on a batch of %d completions: %s", name, n, failure)
            problem = failure
            invalid = [i for i, v in enumerate(values) if v is not None and not _usable(v)]
            if invalid:
                problem = (
                    f"{len(invalid)} of {n} scores unusable (NaN, inf or beyond +-{MAX_ABS_SCORE:g}), "
                    f"e.g. {values[invalid[0]]!r} for completion {invalid[0]}"
                )
                log.warning("reward %r: %s", name, problem)
            scores = [v if _usable(v) else math.nan for v in values]
            if problem is not None or any(v is not None for v in values):  # None alone: no gold, not a fault
                self._track_usable(name, any(_usable(v) for v in values), problem)
            components[name] = torch.tensor(scores, dtype=torch.float32)  # [N]; NaN = no score
            metrics[f"reward/{name}_failures"] = float(n if failure is not None else 0)
            metrics[f"reward/{name}_timeouts"] = float(timed_out)
            metrics[f"reward/{name}_none"] = float(sum(v is None for v in values)) if failure is None else 0.0
            metrics[f"reward/{name}_invalid"] = float(len(invalid))
            metrics[f"time/reward_{name}_s"] = time.monotonic() - start
            if isinstance(term.fn, RewardModel):
                metrics.update({f"reward/{name}_{key}": value for key, value in term.fn.last_metrics.items()})
        total = self._combine(components, n)
        self.scored_batches += 1
        self.usable_batches += int(bool(torch.isfinite(total).any()))
        return RewardScores(total, components, metrics)

    def _start_calls(
        self, prompts: list[str], completions: list[Any], columns: dict[str, list[Any]]
    ) -> dict[str, _Call | None]:
        """Each function's call started on its own daemon thread (None for a function still stuck in earlier
        batches), then each reward model's call run to its end in this thread while those run (its errors
        propagate)."""
        calls: dict[str, _Call | None] = {}
        for term in self.terms:
            self._running[term.name] = [c for c in self._running[term.name] if c.thread.is_alive()]
            if len(self._running[term.name]) >= MAX_STUCK_CALLS:
                calls[term.name] = None  # still stuck in earlier batches: do not start another thread
                continue
            calls[term.name] = _Call(term.fn, prompts, completions, {k: list(v) for k, v in columns.items()})
            if not isinstance(term.fn, RewardModel):
                calls[term.name].thread.start()
        for term in self.terms:
            if isinstance(term.fn, RewardModel):
                calls[term.name].result = term.fn(prompts, completions, **{k: list(v) for k, v in columns.items()})
        return calls

    def _collect(self, name: str, call: _Call | None, n: int) -> tuple[list[float | None], str | None, bool]:
        """``(scores, problem, timed_out)``: the N scores of a finished call, or N Nones and why the call failed.
        Raises ``RewardError`` when the function returned something other than numbers or None."""
        failed: list[float | None] = [None] * n
        if call is None:
            return failed, f"{MAX_STUCK_CALLS} earlier calls are still running", False
        if call.thread.is_alive():  # a reward model's call (never started as a thread) is done here
            self._running[name].append(call)
            return failed, f"timed out after {self.timeout:g} s", True
        if isinstance(call.error, RewardTimeoutError):
            return failed, f"timed out after {self.timeout:g} s: {call.error}", True
        if isinstance(call.error, RewardCrashError):  # died, not slow: the exit code or signal says why
            return failed, f"crashed: {call.error}", False
        if isinstance(call.error, RewardCallError):  # raised in its process: the message names the type
            return failed, f"raised {call.error}", False
        if call.error is not None:
            return failed, f"raised {type(call.error).__name__}: {call.error}", False
        result = call.result
        if isinstance(result, torch.Tensor):
            result = result.tolist()
        if not isinstance(result, (list, tuple)) or len(result) != n:
            size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            return failed, f"returned {size} instead of a list of {n} scores", False
        scores: list[float | None] = []
        for index, value in enumerate(result):
            try:
                scores.append(_as_score(value))
            except TypeError as error:
                raise RewardError(
                    f"reward {name!r} returned a {error} ({value!r:.80}) for completion {index}: a score must be a "
                    "number, or None for no score"
                ) from None
        return scores, None, False

    def _track_usable(self, name: str, usable: bool, problem: str | None) -> None:
        """Stop the run once ``name`` has had no usable score in ``max_unusable_batches`` batches in a row."""
        self._unusable_streak[name] = 0 if usable else self._unusable_streak[name] + 1
        limit = self.max_unusable_batches
        if limit and self._unusable_streak[name] >= limit:
            raise RewardError(
                f"reward {name!r} gave no usable score in {limit} batches in a row "
                f"(last: {problem}); the run cannot learn from it. Fix the function, "
                "or remove it from data.rewards"
            )

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
