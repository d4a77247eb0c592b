"""The noisy-reward arithmetic testbed: which prompts are noisy, and what their reward knows (nothing)."""

from __future__ import annotations

import pytest

from lit_gcpo.rewards import math_accuracy
from lit_gcpo.tasks.arithmetic import arithmetic_splits
from lit_gcpo.tasks.noisy_arithmetic import NoisyArithmeticTask, mark_noisy, noise_coin, noisy_math_accuracy


def test_only_the_chosen_levels_are_noisy_and_validation_is_clean() -> None:
    train = NoisyArithmeticTask("train", num_train=600, num_val=50, seed=3, noisy_levels=[3, 4]).load()
    plain, _ = arithmetic_splits(600, 50, seed=3)
    # the same problems as the plain task of that seed, in the same order: only the noise mark is added
    assert [row["prompt"] for row in train] == [row["prompt"] for row in plain]
    assert all((row["noise_rate"] == 0.25) == (row["level"] in (3, 4)) for row in train)
    assert sum(row["noise_rate"] > 0 for row in train) > 100  # ~30 % of 600 with the default mix
    val = NoisyArithmeticTask("validation", num_train=600, num_val=50, seed=3).load()
    assert len(val) == 50 and all(row["noise_rate"] == 0.0 for row in val)
    # noisy_share: about that fraction of the eligible rows, from the seed (same seed, same marks)
    rows = [{"level": 2} for _ in range(2000)]
    marked = mark_noisy(rows, [2], 0.3, 0.5, seed=1)
    share = sum(row["noise_rate"] > 0 for row in marked) / 2000
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 2000) ** 0.5  # 4 binomial standard deviations
    assert marked == mark_noisy(rows, [2], 0.3, 0.5, seed=1) != mark_noisy(rows, [2], 0.3, 0.5, seed=2)
    with pytest.raises(ValueError, match="noise_rate"):
        NoisyArithmeticTask(noise_rate=1.0)
    with pytest.raises(ValueError, match="noisy_share"):
        NoisyArithmeticTask(noisy_share=1.5)


def test_noisy_rewards_are_coins_that_ignore_the_answer() -> None:
    n = 4000
    prompts = ["3+4*2="] * n
    right, wrong = ["\\boxed{11}"] * n, ["\\boxed{12}"] * n
    columns = {"answer": ["11"] * n, "noise_rate": [0.25] * n}
    for completions in (right, wrong):
        scores = noisy_math_accuracy(prompts, completions, **columns)
        assert abs(sum(scores) / n - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    # identical completions at two positions get independent coins: some pairs differ
    scores = noisy_math_accuracy(prompts[:64], right[:64], **{k: v[:64] for k, v in columns.items()})
    assert 0 < sum(scores) < 64
    assert scores[5] == noise_coin(prompts[5], right[5], 5, 0.25)  # reproducible
    # a clean row is graded exactly, as math_accuracy grades it
    clean = {"answer": ["11", "11", "6"], "noise_rate": [0.0, 0.0, 0.0]}
    texts = ["\\boxed{11}", "\\boxed{12}", "3+4=7"]
    assert noisy_math_accuracy(["a", "b", "c"], texts, **clean) == math_accuracy(["a", "b", "c"], texts, **clean)
    assert noisy_math_accuracy(["a"], ["\\boxed{11}"], answer=["11"]) == [1.0]  # no noise column: clean


def test_noisy_answers_picks_prompts_by_the_length_of_their_gold_answer() -> None:
    # two-operand rows of seed 0: which answers are one digit is read off the problems themselves
    options = {"num_train": 400, "num_val": 10, "mix": {2: 1.0}, "seed": 0}
    every = NoisyArithmeticTask("train", noisy_levels=[2], **options).load()
    assert all(row["noise_rate"] == 0.25 for row in every)  # share 1, level 2: every row
    long_arm = NoisyArithmeticTask("train", noisy_levels=[2], noisy_answers="long", **options).load()
    short_arm = NoisyArithmeticTask("train", noisy_levels=[2], noisy_answers="short", **options).load()
    for row_long, row_short in zip(long_arm, short_arm, strict=True):
        one_digit = len(row_long["answer"]) == 1 and row_long["answer"].isdigit()  # not "-3" nor "12"
        assert (row_long["noise_rate"] > 0) == (not one_digit)
        assert (row_short["noise_rate"] > 0) == one_digit
    # both kinds occur, and a half share keeps about half of each kind (one draw per row, the kinds apart)
    n_long = sum(row["noise_rate"] > 0 for row in long_arm)
    assert 100 < n_long < 300
    half = NoisyArithmeticTask("train", noisy_levels=[2], noisy_answers="long", noisy_share=0.5, **options).load()
    marked = sum(row["noise_rate"] > 0 for row in half)
    assert abs(marked - n_long / 2) < 4 * (n_long * 0.25) ** 0.5
    assert all(row["noise_rate"] == 0 or len(row["answer"]) > 1 for row in half)
    with pytest.raises(ValueError, match="noisy_answers"):
        NoisyArithmeticTask(noisy_answers="odd")  # type: ignore[arg-type]
