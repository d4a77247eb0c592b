"""Reward functions, loading by name or dotted path, and the robust weighted RewardSet."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_gcpo.rewards import (
    REWARDS,
    RewardSet,
    RewardTerm,
    format_reward,
    load_reward,
    math_accuracy,
    qa_exact_match,
    qa_f1,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def _records(name: str) -> list[dict[str, Any]]:
    with open(FIXTURES / f"{name}.sample.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _gold_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(benchmark, a correct completion, the row's gold columns) for every sample record."""
    cases = []
    for r in _records("math500"):
        cases.append(("math500", r["solution"], {"answer": r["answer"]}))
    for r in _records("aime24"):  # golds like "080"; solutions box "\textbf{(55) }"
        cases.append(("aime24", r["solution"], {"answer": r["answer"]}))
    for r in _records("amc23"):  # float golds (27.0), no solution: the integer boxed
        cases.append(("amc23", f"The answer is $\\boxed{{{int(r['answer'])}}}$.", {"answer": r["answer"]}))
    for r in _records("minerva_math"):  # no answer field: gold = last box of the solution
        cases.append(("minerva_math", r["solution"], {"solution": r["solution"]}))
    for r in _records("olympiadbench"):
        boxed = ", ".join(a.strip("$") for a in r["final_answer"])
        completion = f"Thus the answer is $\\boxed{{{boxed}}}$."
        cases.append(("olympiadbench", completion, {"final_answer": r["final_answer"], "solution": r["solution"]}))
    for r in _records("gsm8k"):  # "... #### 18": the worked solution with its result boxed
        body, result = r["answer"].rsplit("####", 1)
        cases.append(("gsm8k", f"{body}The answer is \\boxed{{{result.strip()}}}.", {"answer": r["answer"]}))
    return cases


GOLD_CASES = _gold_cases()


@pytest.mark.parametrize(("benchmark", "completion", "columns"), GOLD_CASES, ids=[c[0] for c in GOLD_CASES])
def test_math_accuracy_grades_gold_solutions_correct(benchmark: str, completion: str, columns: dict) -> None:
    assert math_accuracy([""], [completion], **{k: [v] for k, v in columns.items()}) == [1.0]


@pytest.mark.parametrize(("benchmark", "completion", "columns"), GOLD_CASES, ids=[c[0] for c in GOLD_CASES])
def test_math_accuracy_grades_a_wrong_answer_incorrect(benchmark: str, completion: str, columns: dict) -> None:
    wrong = "The answer is \\boxed{123456789}."  # no sample's gold equals it
    truncated = completion.replace("\\boxed", "")  # the correct work without a final boxed answer
    cols = {k: [v, v] for k, v in columns.items()}
    assert math_accuracy(["", ""], [wrong, truncated], **cols) == [0.0, 0.0]


def test_math_accuracy_equivalent_forms_and_missing_gold() -> None:
    completions = ["\\boxed{\\frac12}", "so \\boxed{0.5}", "\\boxed{1/2}", "\\boxed{0.6}", "0.5", "\\boxed{2}"]
    golds = ["0.5", "\\frac{1}{2}", "$\\frac{1}{2}$", "0.5", "0.5", None]
    # the last row has no gold: no score (None), not 0
    assert math_accuracy([""] * 6, completions, answer=golds) == [1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_math_accuracy_accepts_chat_completions() -> None:
    chat = [[{"role": "assistant", "content": "It is \\boxed{4}."}]]
    assert math_accuracy([""], chat, answer=["4"]) == [1.0]


def _timed_math_accuracy(completion: str) -> tuple[float | None, float]:
    _ = math_accuracy([""], ["\\boxed{3}"], answer=[f"\\frac{{{time.monotonic_ns()}}}{{1}}"])  # warm process
    start = time.monotonic()
    scores = math_accuracy([""], [completion], answer=["0"])
    return scores[0], time.monotonic() - start


def test_adversarial_python_in_a_box_scores_zero_and_runs_nothing(tmp_path) -> None:
    target = tmp_path / "pwned"
    score, elapsed = _timed_math_accuracy(f"\\boxed{{__import__('os').system('touch {target}')}}")
    assert score == 0.0
    assert not target.exists()
    assert elapsed < 3 * 1.0  # GRADING_TIMEOUT_S is 1 s; a safety property, not a benchmark


def test_adversarial_huge_exponent_scores_zero_promptly() -> None:
    score, elapsed = _timed_math_accuracy("\\boxed{9^{9^{9^{9}}}}")
    assert score == 0.0
    assert elapsed < 3 * 1.0


def test_adversarial_deep_nesting_scores_zero_promptly() -> None:
    score, elapsed = _timed_math_accuracy("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}")
    assert score == 0.0
    assert elapsed < 3 * 1.0


def test_format_reward() -> None:
    completions = ["\\boxed{3}", "no answer", "\\boxed{}", "truncated \\boxed{3"]
    assert format_reward([""] * 4, completions) == [1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------- QA
def test_qa_exact_match_and_f1_by_hand() -> None:
    completions = [
        "Answer: The Servant of Wanda\nbecause ...",  # text after "Answer:" up to the line end
        "He lived in \\boxed{Pittsburgh}.",  # a box wins over the rest
        "three generations",  # neither: the whole text
        "Answer: no idea",
    ]
    answers = [["Servant", "Wanda's Servant"], ["Pittsburgh.", "Pittsburgh"], ["Three generations.", "Three"], "yes"]
    assert qa_exact_match([""] * 4, completions, answer=answers) == [0.0, 1.0, 1.0, 0.0]
    # 1: "servant of wanda" (3 tokens, "the" dropped) vs "servant": common 1, P 1/3, R 1 -> F1 1/2;
    #    vs "wandas servant" (punctuation dropped): common 1 ("servant"), P 1/3, R 1/2 -> F1 2/5; max 1/2.
    # 3: "three generations" vs "three": P 1/2, R 1 -> 2/3; vs "three generations" -> 1; max 1.
    # 4: "no idea" vs "yes": no common token -> 0.
    assert qa_f1([""] * 4, completions, answer=answers) == pytest.approx([0.5, 1.0, 1.0, 0.0], abs=1e-12)


def test_qa_f1_partial_overlap_and_squad_answers_column() -> None:
    # "a big red dog" -> "big red dog"; reference "the red dog barked" -> "red dog barked":
    # common {red, dog} = 2, P = 2/3, R = 2/3 -> F1 = 2/3.
    scores = qa_f1([""], ["a big red dog"], answers=[{"text": ["the red dog barked"]}])
    assert scores == pytest.approx([2 / 3], abs=1e-12)
    assert qa_f1([""], ["anything"], answer=[None]) == [None]


# ----------------------------------------------------------------------------------------- loading
def test_load_reward_by_name_and_dotted_path() -> None:
    assert load_reward("math_accuracy") is math_accuracy
    assert load_reward("lit_gcpo.rewards.qa:qa_f1") is qa_f1
    assert load_reward("lit_gcpo.rewards.qa.qa_exact_match") is qa_exact_match
    assert set(REWARDS.names()) >= {"math_accuracy", "format", "qa_exact_match", "qa_f1"}


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("math_acc", "valid names: format, math_accuracy"),
        ("no_such_pkg.rewards:score", "cannot import module 'no_such_pkg.rewards'"),
        ("lit_gcpo.rewards.qa:no_such_fn", "has no attribute 'no_such_fn'"),
        ("lit_gcpo.rewards.math_reward:GRADING_TIMEOUT_S", "not a callable"),
    ],
)
def test_load_reward_errors_name_the_path(name: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        load_reward(name)
    assert repr(name) in str(info.value)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------- RewardSet
def _length(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [float(len(c)) for c in completions]


def _half_none(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [1.0 if i % 2 == 0 else None for i in range(len(completions))]


def _raises(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    raise RuntimeError("user bug")


def _wrong_length(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [1.0]


@pytest.fixture
def hang():
    """A reward function that blocks for 100 s (released at teardown so no thread outlives the test)."""
    release = threading.Event()

    def _hangs(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
        release.wait(100)
        return [0.0] * len(completions)

    yield _hangs
    release.set()


def test_weighted_total_by_hand() -> None:
    rewards = RewardSet([RewardTerm("length", _length, 0.5), RewardTerm("half", _half_none, 2.0)])
    scores = rewards.score(["p"] * 3, ["ab", "abcd", ""], [{}] * 3)
    # length: [2, 4, 0] * 0.5 = [1, 2, 0]; half: [1, None, 1] * 2 = [2, (0), 2] -> total [3, 2, 2]
    torch.testing.assert_close(scores.total, torch.tensor([3.0, 2.0, 2.0]))
    torch.testing.assert_close(scores.components["length"], torch.tensor([2.0, 4.0, 0.0]))
    assert torch.isnan(scores.components["half"][1]) and scores.components["half"][0].item() == 1.0
    assert scores.metrics["reward/half_none"] == 1.0
    assert scores.metrics["reward/half_failures"] == 0.0


def test_raising_and_hanging_rewards_are_counted_and_others_still_score(hang) -> None:
    rewards = RewardSet(
        [
            RewardTerm("length", _length, 1.0),
            RewardTerm("raises", _raises, 1.0),
            RewardTerm("hangs", hang, 1.0),
            RewardTerm("bad_size", _wrong_length, 1.0),
        ],
        timeout=0.5,
    )
    start = time.monotonic()
    scores = rewards.score(["p", "p"], ["abc", "a"], [{"answer": "1"}, {"answer": "2"}])
    assert time.monotonic() - start < 3 * 0.5
    for name in ("raises", "hangs", "bad_size"):
        assert torch.isnan(scores.components[name]).all()
        assert scores.metrics[f"reward/{name}_failures"] == 2.0
    assert scores.metrics["reward/length_failures"] == 0.0
    # failed components add 0: the total is the length reward alone
    torch.testing.assert_close(scores.total, torch.tensor([3.0, 1.0]))


def test_total_is_nan_only_where_every_component_failed() -> None:
    rewards = RewardSet([RewardTerm("half", _half_none, 1.0), RewardTerm("raises", _raises, 1.0)])
    scores = rewards.score(["p"] * 2, ["a", "b"], [{}] * 2)
    assert scores.total[0].item() == 1.0 and math.isnan(scores.total[1].item())


def test_a_reward_that_always_hangs_is_not_restarted_past_the_limit(hang) -> None:
    rewards = RewardSet([RewardTerm("hangs", hang, 1.0), RewardTerm("length", _length, 1.0)], timeout=0.2)
    alive_before = threading.active_count()
    for _ in range(4):
        scores = rewards.score(["p"], ["ab"], [{}])
        assert scores.metrics["reward/hangs_failures"] == 1.0
        assert scores.total.tolist() == [2.0]
    # MAX_STUCK_CALLS (2) calls are left running; the 3rd and 4th batches did not start a thread
    assert threading.active_count() - alive_before == 2


def test_from_names_with_a_user_path_and_weights() -> None:
    rewards = RewardSet.from_names(["format", "lit_gcpo.rewards.qa:qa_exact_match"], [0.25, 1.0], timeout=5)
    scores = rewards.score(["q"] * 2, ["\\boxed{Paris}", "Answer: Rome"], [{"answer": "paris"}] * 2)
    # format [1, 0] * 0.25 + exact match [1, 0] -> [1.25, 0]
    torch.testing.assert_close(scores.total, torch.tensor([1.25, 0.0]))
    with pytest.raises(ValueError, match="2 entries for 1 rewards"):
        RewardSet.from_names(["format"], [1.0, 2.0])
    with pytest.raises(ValueError, match="unique"):
        RewardSet([RewardTerm("a", _length), RewardTerm("a", _length)])


def test_math_accuracy_inside_a_reward_set() -> None:
    rewards = RewardSet.from_names(["math_accuracy", "format"], [1.0, 0.1])
    rows = [{"answer": "\\frac{1}{2}"}] * 3
    scores = rewards.score(["q"] * 3, ["\\boxed{0.5}", "\\boxed{0.4}", "0.5"], rows)
    torch.testing.assert_close(scores.components["math_accuracy"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores.total, torch.tensor([1.1, 0.1, 0.0]))
