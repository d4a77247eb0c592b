"""The grading defects of issue 13: inner ``$`` in golds, tiny numbers, and the empty ``\\boxed{}``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation import load_benchmark, majority_answer
from lit_gcpo.evaluation.grading import grade_completion, majority_grade, math_equivalent, qa_equivalent
from lit_gcpo.evaluation.results import rollout_records, summarise
from lit_gcpo.rewards import math_accuracy, qa_exact_match, qa_f1
from lit_gcpo.rewards.answers import answers_equivalent, gold_answer

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
MATH_BENCHMARKS = ("math500", "aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k")  # = file stems


# ------------------------------------------------------------------------------ 1. golds as boxed
@pytest.mark.parametrize(
    ("published", "expected"),
    [
        (["$69$,$84$"], "69, 84"),  # OlympiadBench: several answers in one element (was "69$,$84")
        (["$(1,2)$, $(3,4)$"], "(1,2), (3,4)"),
        (["$3$ and $4$"], "3, 4"),
        (["$1$, $2$, $3$"], "1, 2, 3"),
        (["$x=1$ or $x=2$"], "x=1 or x=2"),  # prose between the pieces stays, the delimiters go
        (["$2$", "$3$"], "2, 3"),  # two elements
        (["$$7$$"], "7"),  # display math
        (["$\\frac{1}{2}$"], "\\frac{1}{2}"),
        ("\\$5", "\\$5"),  # an escaped dollar is content
        ("$\\$5$", "\\$5"),
        (["16"], "16"),  # the sample records' layout: no dollars at all
    ],
)
def test_gold_without_inner_dollars(published: object, expected: str) -> None:
    assert gold_answer(published) == expected


def test_olympiadbench_list_gold_is_graded_against_a_correct_box(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "olympiadbench.sample.jsonl").read_text().splitlines()]
    rows[0]["final_answer"] = ["$69$,$84$"]
    path = tmp_path / "olympiad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    item = load_benchmark("olympiadbench", str(path)).items[0]
    assert item["gold"] == "69, 84"
    assert grade_completion("math", "so \\boxed{69, 84}", item["gold"]).correct
    assert grade_completion("math", "so \\boxed{69,84}", item["gold"]).correct
    assert not grade_completion("math", "so \\boxed{69}", item["gold"]).correct
    # the training reward reads the same published field the same way
    assert math_accuracy(["q"], ["\\boxed{69, 84}"], final_answer=[["$69$,$84$"]]) == [1.0]


@pytest.mark.parametrize("name", MATH_BENCHMARKS)
def test_every_sample_gold_is_matched_by_its_boxed_form_and_not_by_a_wrong_one(name: str) -> None:
    """No regression: every sample gold, boxed, is correct; the gold with a digit changed is not."""
    items = load_benchmark(name, str(FIXTURES / f"{name}.sample.jsonl")).items
    assert len(items) == 5
    for item in items:
        gold = item["gold"]
        assert "$" not in gold, (name, gold)
        assert grade_completion("math", f"The answer is $\\boxed{{{gold}}}$.", gold).correct, (name, gold)
        digits = [i for i, c in enumerate(gold) if c.isdigit()]
        changed = gold[: digits[0]] + str((int(gold[digits[0]]) + 3) % 10) + gold[digits[0] + 1 :]
        assert not grade_completion("math", f"\\boxed{{{changed}}}", gold).correct, (name, gold, changed)


# ----------------------------------------------------------------------------- 2. tiny numbers
@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        # the cases: Math-Verify alone rounds both to 0.000000 and calls them equal
        ("2.88 \\times 10^{-19}", "1.325 \\times 10^{-27}", False),
        ("2.88 \\times 10^{-19}", "-5 \\times 10^{-19}", False),
        ("2.88 \\times 10^{-19}", "2.88 \\times 10^{-19}", True),
        ("4.6e-24", "4.6 \\times 10^{-24}", True),  # Minerva's sample gold, another notation
        ("4.6e-24", "4.6 \\times 10^{-24} \\mathrm{~m}", True),  # with a unit
        ("4.6e-24", "4.7 \\times 10^{-24}", False),  # 2 % apart
        ("4.6e-24", "4.6000001 \\times 10^{-24}", True),  # 2e-8 relative: within 1e-4
        ("-3.2 \\times 10^{-20}", "-3.2e-20", True),  # negative
        ("-3.2 \\times 10^{-20}", "3.2e-20", False),
        ("0", "1.0 \\times 10^{-30}", False),  # zero against a tiny number
        ("6.02 \\times 10^{23}", "6.02 \\times 10^{23}", True),  # huge
        ("6.02 \\times 10^{23}", "6.03 \\times 10^{23}", False),
        ("\\frac{1}{3}", "0.333333333", True),  # ordinary sizes keep Math-Verify's verdict
        ("0.5", "\\frac{1}{2}", True),
    ],
)
def test_numbers_far_from_one_compare_relatively(gold: str, answer: str, equal: bool) -> None:
    assert answers_equivalent(gold, answer) is equal
    assert math_equivalent(gold, answer) is equal


# --------------------------------------------------------------------------------- 3. empty box
def test_empty_box_is_no_answer_for_math_and_qa() -> None:
    assert grade_completion("math", "I give up: \\boxed{}", "5").answer is None
    assert grade_completion("math", "\\boxed{ }", "5").answer is None
    assert grade_completion("qa", "\\boxed{}", ["Paris"]).answer is None
    assert not grade_completion("qa", "\\boxed{}", [""]).correct  # not even against an empty reference


def test_empty_box_scores_zero_in_the_qa_rewards() -> None:
    # "The" normalises to nothing (articles dropped), as does an empty box: equal, but not an answer.
    for reward in (qa_exact_match, qa_f1):
        assert reward(["q", "q"], ["\\boxed{}", "\\boxed{the}"], gold=[["The"], ["The"]]) == [0.0, 1.0]


def test_empty_box_cannot_win_the_majority_vote() -> None:
    # Three empty boxes and one "5": the empty answers do not vote, "5" is the majority.
    assert majority_answer(["", "", " ", "5"], math_equivalent) == "5"
    assert majority_answer(["", ""], qa_equivalent) is None
    assert majority_grade("math", ["", "", "5"], "5").correct
    assert not majority_grade("math", ["", ""], "").correct


def test_rollout_records_treat_the_rollouts_empty_box_as_no_answer() -> None:
    completions = ["\\boxed{}", "\\boxed{}", "\\boxed{}", "\\boxed{7}"]
    batch = RolloutBatch(
        prompts=["p"],
        rows=[{"id": "a", "index": 0, "kind": "math", "benchmark": "toy", "gold": "7"}],
        completions=completions,
        input_ids=torch.zeros(4, 2, dtype=torch.long),
        attention_mask=torch.ones(4, 2, dtype=torch.long),
        completion_mask=torch.ones(4, 1),
        group_ids=torch.zeros(4, dtype=torch.long),
        rewards=torch.zeros(4),
        answers=["", "", "", "7"],  # what the rollout's extract_boxed gives
    )
    (record,) = rollout_records(batch)
    assert record["answers"] == [None, None, None, "7"]
    assert record["majority_answer"] == "7" and record["majority_correct"] is True
    assert summarise([record])["toy"]["maj@4"] == 1.0
