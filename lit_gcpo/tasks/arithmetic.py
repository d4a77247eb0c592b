"""A synthetic arithmetic task with graded difficulty: the quickstart's CPU-sized RL problem.

A problem is an expression of ``level`` single-digit operands joined by ``+``, ``-`` and ``*`` (usual
precedence: ``*`` first, then ``+``/``-`` left to right), e.g. the level-3 prompt ``3+4*2=``. Gold answers
are plain integers (negatives allowed), so a reward that compares the last ``\\boxed{}`` of a completion
with ``answer`` by math-verify equivalence scores it.

The worked solution (the format the tiny warm-started policy is taught, see ``lit_gcpo.assets.tiny_model``)
rewrites the expression one operation at a time, each intermediate expression ending with ``=``, and
boxes the result of the last operation::

    3+4*2-5=  ->  3+8-5=11-5=\\boxed{6}
    7*8=      ->  \\boxed{56}
    6=        ->  \\boxed{6}

Rows are plain dicts ``{"prompt", "answer", "level"}``; ``prompt`` is the exact text the model sees.
Splits (project's choice): the validation and the training rows are independent draws from two different
random streams of ``seed`` (``2 * seed + 1`` and ``2 * seed``). They are NOT prompt-disjoint by default: level
1 has only 10 distinct prompts and level 2 only 300, and a policy must know those arithmetic facts to solve
anything, so excluding the validation's facts from training would measure the wrong thing. Levels 3 and 4
(3,000 and 270,000 distinct prompts) overlap little. ``disjoint=True`` redraws every training prompt that
occurs in the validation split.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lit_gcpo.data.sources import PromptSource

OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
"""The binary operators of the task, by symbol."""

BOX_OPEN = "\\boxed{"
MAX_LEVEL = 6
# Redraw budget for the train/validation disjointness; a mix whose levels cannot avoid the
# validation prompts (e.g. only level 1 with 10 validation rows) fails instead of looping forever.
_MAX_REDRAWS = 1000


@dataclass(frozen=True)
class ArithmeticProblem:
    """One expression of single-digit operands.

    Attributes:
        operands: the operands, each in ``0..9``; ``level == len(operands)``.
        operators: the symbols between them, ``len(operands) - 1`` of ``+ - *``.
    """

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.operands or len(self.operators) != len(self.operands) - 1:
            raise ValueError(
                f"ArithmeticProblem needs n >= 1 operands and n - 1 operators, got "
                f"{len(self.operands)} operands and {len(self.operators)} operators"
            )
        if any(op not in OPERATORS for op in self.operators):
            raise ValueError(f"ArithmeticProblem.operators must be among {list(OPERATORS)}, got {self.operators}")

    @property
    def level(self) -> int:
        return len(self.operands)

    @property
    def prompt(self) -> str:
        return _render(self.operands, self.operators) + "="

    @property
    def answer(self) -> str:
        operands, operators = list(self.operands), list(self.operators)
        while operators:
            operands, operators = _reduce_once(operands, operators)
        return str(operands[0])

    @property
    def solution(self) -> str:
        """The worked completion (without EOS): one reduction per ``=``, the last one boxed."""
        operands, operators = list(self.operands), list(self.operators)
        steps: list[str] = []
        while len(operators) > 1:
            operands, operators = _reduce_once(operands, operators)
            steps.append(_render(operands, operators) + "=")
        return "".join(steps) + BOX_OPEN + self.answer + "}"

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "level": self.level}


def _render(operands: Sequence[int], operators: Sequence[str]) -> str:
    parts = [str(operands[0])]
    for symbol, value in zip(operators, operands[1:], strict=True):
        parts.append(symbol + str(value))
    return "".join(parts)


def _reduce_once(operands: list[int], operators: list[str]) -> tuple[list[int], list[str]]:
    """Apply the first operation in evaluation order: the leftmost ``*``, else the leftmost ``+``/``-``."""
    position = operators.index("*") if "*" in operators else 0
    value = OPERATORS[operators[position]](operands[position], operands[position + 1])
    return (
        [*operands[:position], value, *operands[position + 2 :]],
        [*operators[:position], *operators[position + 1 :]],
    )


def _normalise_mix(mix: Mapping[int, float]) -> tuple[list[int], list[float]]:
    levels = sorted(int(level) for level in mix)
    weights = [float(mix[level]) for level in levels]
    for level, weight in zip(levels, weights, strict=True):
        if not 1 <= level <= MAX_LEVEL:
            raise ValueError(f"mix level {level} is outside 1..{MAX_LEVEL}")
        if weight < 0:
            raise ValueError(f"mix weight of level {level} must be >= 0, got {weight}")
    if not levels or sum(weights) <= 0:
        raise ValueError(f"mix needs at least one level with a positive weight, got {dict(mix)}")
    return levels, weights


def sample_problem(level: int, rng: random.Random) -> ArithmeticProblem:
    """A uniformly random problem of ``level`` operands (operands uniform in 0..9, operators uniform)."""
    operands = tuple(rng.randrange(10) for _ in range(level))
    operators = tuple(rng.choice(tuple(OPERATORS)) for _ in range(level - 1))
    return ArithmeticProblem(operands, operators)


def sample_problems(
    num_rows: int, mix: Mapping[int, float], seed: int, exclude: frozenset[str] = frozenset()
) -> list[ArithmeticProblem]:
    """``num_rows`` problems, the level of each drawn from ``mix`` (weights per level, any scale).

    Args:
        num_rows: how many problems.
        mix: level -> weight; levels absent or weighted 0 never appear.
        seed: seeds a private ``random.Random``; the same arguments give the same problems.
        exclude: prompts that must not appear (a problem hitting one is redrawn at the same level).
    """
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    levels, weights = _normalise_mix(mix)
    rng = random.Random(seed)
    problems = []
    for index in range(num_rows):
        level = rng.choices(levels, weights)[0]
        for _ in range(_MAX_REDRAWS):
            problem = sample_problem(level, rng)
            if problem.prompt not in exclude:
                break
        else:
            raise ValueError(
                f"row {index}: every level-{level} problem drawn was in the excluded (validation) prompts; "
                f"lower the validation size or the weight of level {level}"
            )
        problems.append(problem)
    return problems


DEFAULT_MIX: dict[int, float] = {1: 0.05, 2: 0.65, 3: 0.2, 4: 0.1}
"""The task's default difficulty mix (weights per number of operands), used when a source gives none.

GRPO gains come mostly from two-operand problems (the ones where sampling 8 completions often finds the
answer greedy decoding misses); levels 3 and 4 give mostly all-wrong groups at the start, so they are kept
as a minority of harder, uncertain prompts. The quickstart sets its own mix (``configs/quickstart.yaml``:
two-operand problems only, the ones RL teaches the tiny policy within minutes).
"""

WARM_START_MIX: dict[int, float] = {1: 0.05, 2: 0.5, 3: 0.3, 4: 0.15}
"""The difficulty mix of the supervised warm start of ``lit-gcpo/tiny-arith`` (scripts/build_tiny_model.py)."""


def arithmetic_splits(
    num_train: int,
    num_val: int,
    mix: Mapping[int, float] | None = None,
    val_mix: Mapping[int, float] | None = None,
    seed: int = 0,
    disjoint: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic, prompt-disjoint train and validation rows ``{"prompt", "answer", "level"}``.

    Args:
        num_train: number of training rows (prompts may repeat within the split).
        num_val: number of validation rows.
        mix: difficulty mix of the training rows, level -> weight; ``DEFAULT_MIX`` when None.
        val_mix: difficulty mix of the validation rows; the training mix when None.
        seed: the validation rows use stream ``2 * seed + 1`` and the training rows ``2 * seed``, so
            changing ``num_train`` never changes the validation rows.
        disjoint: redraw training problems whose prompt is in the validation split (see the module
            docstring; fails when a level's prompts are all taken by the validation split).
    """
    mix = DEFAULT_MIX if mix is None else mix
    val_mix = mix if val_mix is None else val_mix
    val = sample_problems(num_val, val_mix, seed=2 * seed + 1)
    exclude = frozenset(problem.prompt for problem in val) if disjoint else frozenset()
    train = sample_problems(num_train, mix, seed=2 * seed, exclude=exclude)
    return [problem.to_row() for problem in train], [problem.to_row() for problem in val]


class ArithmeticTask(PromptSource):
    """The built-in synthetic arithmetic task generated from a seed (``arithmetic_splits``).

    Training and validation rows come from one call with the same ``seed``, ``num_train``, ``num_val``
    and ``mix``; with ``disjoint`` they never share a prompt (a level has only 10^k x 3^(k-1) prompts, so
    the easy levels cannot always be kept apart).

    Args:
        split: ``train`` or ``validation``.
        num_train: problems in the training split.
        num_val: problems in the validation split.
        mix: relative frequency of each difficulty level (number of operands), e.g. ``{2: 0.5, 3: 0.5}``;
            None is the task's default mix.
        seed: the generator's seed.
        disjoint: redraw training problems whose prompt is a validation prompt.
        fields: renames columns, ``{source_name: name_used_here}``.
        limit: keep only the first ``limit`` rows (0 = all).
    """

    def __init__(
        self,
        split: Literal["train", "validation"] = "train",
        num_train: int = 5000,
        num_val: int = 256,
        mix: dict[int, float] | None = None,
        seed: int = 0,
        disjoint: bool = False,
        fields: dict[str, str] | None = None,
        limit: int = 0,
    ) -> None:
        super().__init__(fields, limit)
        self.disjoint = disjoint
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
        self.split, self.num_train, self.num_val, self.mix, self.seed = split, num_train, num_val, mix, seed

    def _read(self) -> list[dict[str, Any]]:
        train, val = arithmetic_splits(
            self.num_train, self.num_val, mix=self.mix, seed=self.seed, disjoint=self.disjoint
        )
        return train if self.split == "train" else val

    def describe(self) -> str:
        return f"arithmetic[{self.split}](seed={self.seed})"
