"""The synthetic arithmetic task: gold answers, worked solutions, seeds, splits and the difficulty mix."""

from __future__ import annotations

import collections
import operator
import random
import re

import pytest

from lit_gcpo.tasks.arithmetic import (
    DEFAULT_MIX,
    ArithmeticProblem,
    arithmetic_splits,
    sample_problem,
    sample_problems,
)


def _evaluate_by_terms(operands: tuple[int, ...], operators: tuple[str, ...]) -> int:
    """Independent evaluator: split into signed additive terms, each a product of a ``*`` run, and sum them.

    (The task itself reduces the expression one operation at a time; this never builds intermediate
    expressions.)
    """
    total, sign, term = 0, 1, operands[0]
    for symbol, value in zip(operators, operands[1:], strict=True):
        if symbol == "*":
            term = operator.mul(term, value)
        else:
            total += sign * term
            sign, term = (1 if symbol == "+" else -1), value
    return total + sign * term


def _parse_expression(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Operands and operators of a generated expression such as ``-13+5*2`` (multi-digit, leading minus)."""
    first = re.match(r"-?\d+", text)
    assert first is not None, text
    rest = re.findall(r"([+*-])(\d+)", text[first.end() :])
    assert first.group() + "".join(symbol + digits for symbol, digits in rest) == text
    return (int(first.group()), *(int(digits) for _, digits in rest)), tuple(symbol for symbol, _ in rest)


def test_hand_derived_examples() -> None:
    # 3+4*2-5: multiply first (4*2 = 8), then left to right: 3+8 = 11, 11-5 = 6.
    problem = ArithmeticProblem((3, 4, 2, 5), ("+", "*", "-"))
    assert problem.prompt == "3+4*2-5="
    assert problem.answer == "6"
    assert problem.solution == "3+8-5=11-5=\\boxed{6}"
    assert problem.level == 4
    # 2-9*9*1: 9*9 = 81, 81*1 = 81, 2-81 = -79 (negative gold answers are plain "-79").
    problem = ArithmeticProblem((2, 9, 9, 1), ("-", "*", "*"))
    assert problem.solution == "2-81*1=2-81=\\boxed{-79}"
    # 8-3-4 is left-associative: (8-3)-4 = 1, not 8-(3-4) = 9.
    assert ArithmeticProblem((8, 3, 4), ("-", "-")).answer == "1"
    assert ArithmeticProblem((7,), ()).solution == "\\boxed{7}"
    assert ArithmeticProblem((7, 8), ("*",)).to_row() == {"prompt": "7*8=", "answer": "56", "level": 2}


def test_gold_answers_match_an_independent_evaluator() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        problem = sample_problem(rng.randint(1, 6), rng)
        assert problem.prompt.endswith("=")
        operands, operators = _parse_expression(problem.prompt[:-1])
        assert (operands, operators) == (problem.operands, problem.operators)
        assert problem.answer == str(_evaluate_by_terms(operands, operators)), problem.prompt
        # The worked solution boxes the gold answer, every intermediate expression has the gold value,
        # and each step removes exactly one operation.
        steps = problem.solution.split("=")
        assert steps[-1] == "\\boxed{" + problem.answer + "}"
        assert len(steps) == max(1, problem.level - 1)
        for number, step in enumerate(steps[:-1], start=1):
            step_operands, step_operators = _parse_expression(step)
            assert len(step_operators) == len(operators) - number
            assert str(_evaluate_by_terms(step_operands, step_operators)) == problem.answer, problem.solution


def test_rows_are_deterministic_by_seed() -> None:
    first = [p.to_row() for p in sample_problems(500, DEFAULT_MIX, seed=3)]
    again = [p.to_row() for p in sample_problems(500, DEFAULT_MIX, seed=3)]
    other = [p.to_row() for p in sample_problems(500, DEFAULT_MIX, seed=4)]
    assert first == again
    assert first != other
    assert arithmetic_splits(300, 100, seed=1) == arithmetic_splits(300, 100, seed=1)


def test_level_distribution_follows_the_mix() -> None:
    mix = {1: 1.0, 2: 5.0, 3: 3.0, 4: 1.0}  # any scale: normalised to 0.1, 0.5, 0.3, 0.1
    n = 20_000
    counts = collections.Counter(p.level for p in sample_problems(n, mix, seed=0))
    for level, weight in mix.items():
        expected = weight / 10.0
        # binomial std <= sqrt(0.25 / 20000) = 0.0035; 4 std = 0.014.
        assert abs(counts[level] / n - expected) < 0.014, (level, counts[level])
    assert set(counts) == set(mix)
    assert collections.Counter(p.level for p in sample_problems(500, {3: 1.0, 4: 0.0}, seed=0)) == {3: 500}


def test_validation_rows_do_not_depend_on_the_training_size_and_follow_their_own_mix() -> None:
    _, val_small = arithmetic_splits(10, 200, seed=0)
    train_big, val_big = arithmetic_splits(5000, 200, seed=0)
    assert val_small == val_big
    assert train_big[:200] != val_big  # different random streams
    _, val_hard = arithmetic_splits(10, 300, mix={2: 1.0}, val_mix={4: 1.0}, seed=0)
    assert {row["level"] for row in val_hard} == {4}


def test_disjoint_splits_share_no_prompt() -> None:
    # No level 1 here: its 10 prompts are all taken by a validation split of this size (see the next test).
    mix = {2: 1.0, 3: 1.0, 4: 1.0}
    train, val = arithmetic_splits(3000, 300, mix=mix, seed=2, disjoint=True)
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in val}
    # Without the option, the small levels overlap (level 2 has only 300 prompts).
    train, val = arithmetic_splits(3000, 300, mix=mix, seed=2)
    assert {row["prompt"] for row in train} & {row["prompt"] for row in val}


def test_impossible_disjointness_and_bad_mixes_fail_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="level-1"):
        arithmetic_splits(10, 500, mix={1: 1.0}, disjoint=True)  # 500 draws take all 10 level-1 prompts
    with pytest.raises(ValueError, match="level 9"):
        sample_problems(1, {9: 1.0}, seed=0)
    with pytest.raises(ValueError, match="weight of level 2"):
        sample_problems(1, {2: -1.0}, seed=0)
    with pytest.raises(ValueError, match="positive weight"):
        sample_problems(1, {2: 0.0}, seed=0)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticProblem((1, 2), ("/",))
