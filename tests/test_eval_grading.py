"""The grading defects of issue 13 (inner ``$`` in golds, tiny numbers, the empty ``\\boxed{}``) and of
issue 25 (several boxes, answers without a box, number forms)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation import load_benchmark, majority_answer
from lit_gcpo.evaluation.callback import BenchmarkReport
from lit_gcpo.evaluation.grading import grade_completion, majority_grade, math_equivalent, qa_equivalent
from lit_gcpo.evaluation.results import rollout_records, summarise
from lit_gcpo.rewards import math_accuracy, qa_exact_match, qa_f1
from lit_gcpo.rewards.answers import answers_equivalent, final_answer, gold_answer

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


# ----------------------------------------------------- issue 25.11: several boxes, one multi-part answer
@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("\\boxed{3}, \\boxed{5}", "3, 5", True),
        ("So $\\boxed{3}$ and $\\boxed{5}$.", "3, 5", True),
        ("\\boxed{5}, \\boxed{3}", "3, 5", True),  # a set, as Math-Verify reads "3, 5"
        ("\\boxed{(1,2)}, \\boxed{(3,4)}", "(1,2), (3,4)", True),
        ("\\boxed{69} and \\boxed{84}", ["$69$,$84$"], True),  # OlympiadBench's final_answer
        ("\\boxed{69, 84}", ["$69$,$84$"], True),  # one box with both parts, as before
        ("First \\boxed{2}. So the answer is \\boxed{7}.", "7", True),  # a box apart: an intermediate result
        ("\\boxed{3}, \\boxed{5}", "3", False),  # two answers against one: no false positive
        ("\\boxed{3}, \\boxed{5}", "5", False),  # (the last box alone made this hedge correct)
        ("\\boxed{3} or \\boxed{5}", "5", False),
        ("\\boxed{69}", ["$69$,$84$"], False),  # half of the answer
        ("\\boxed{69}, \\boxed{84}, \\boxed{12}", ["$69$,$84$"], False),  # more than the answer
        ("We get \\boxed{69}. Then \\boxed{84}.", ["$69$,$84$"], False),  # apart: only the last box
    ],
)
def test_boxes_listed_together_are_one_answer(completion: str, gold: object, correct: bool) -> None:
    assert grade_completion("math", completion, gold).correct is correct
    # the training reward reads the same final answer
    assert math_accuracy(["q"], [completion], answer=[gold]) == [float(correct)]


def test_the_rollouts_answers_list_the_boxes_together() -> None:
    assert final_answer("so \\boxed{3}, \\boxed{5}") == "3, 5"
    assert final_answer("\\boxed{\\boxed{3}}") == "3"  # a box around a box is one box
    assert final_answer("\\boxed{2} and \\boxed{7}") == "2, 7"
    assert final_answer("\\boxed{2} and then \\boxed{7}") == "7"  # "then": text between them
    assert final_answer("\\boxed{2}; therefore \\boxed{7}") == "7"
    assert final_answer("\\boxed{2}, or \\(\\boxed{7}\\)") == "2, 7"
    assert final_answer("\\boxed{6}\\boxed{6}") == "6"  # no separator: a repeated box, as Math-Verify reads it
    assert final_answer("\\boxed{6}\n\\boxed{7}") == "7"
    assert final_answer("no box") is None


# ------------------------------------------------------------ issue 25.12: answers without a box
@pytest.mark.parametrize(
    ("completion", "gold", "fallback", "correct"),
    [
        ("The answer is 42.", "42", "none", False),  # the default: a completion must box its answer
        ("The answer is 42.", "42", "last_number", True),
        ("It costs 1,234 dollars", "1234", "last_number", True),
        ("We find x = -3.5 in the end", "-\\frac{7}{2}", "last_number", True),
        ("I think 42, but checking again it is 41.", "42", "last_number", False),  # the last number only
        ("The final answer is $\\frac{1}{2}$.", "0.5", "math_verify", True),
        ("The final answer is $\\frac{1}{2}$.", "0.5", "last_number", False),  # "2": the last number
        ("The final answer is $\\frac{1}{3}$.", "0.5", "math_verify", False),
        ("The answer is 42 apples.", "42", "math_verify", False),  # plain text: only LaTeX is extracted
        ("Clearly 42, so \\boxed{41}", "42", "last_number", False),  # a box is the answer: no fallback
        ("Clearly 42, so \\boxed{}", "42", "last_number", False),  # an empty box is no answer, not a fallback
        ("no number here", "42", "last_number", False),
    ],
)
def test_an_unboxed_answer_is_read_only_with_a_fallback(completion: str, gold: str, fallback: str, correct: bool):
    assert grade_completion("math", completion, gold, fallback).correct is correct


def test_the_report_reads_unboxed_answers_by_its_fallback_and_refuses_an_unknown_one() -> None:
    batch = RolloutBatch(
        prompts=["p"],
        rows=[{"id": "a", "index": 0, "kind": "math", "benchmark": "toy", "gold": "42"}],
        completions=["It is 42.", "\\boxed{42}"],
        input_ids=torch.zeros(2, 2, dtype=torch.long),
        attention_mask=torch.ones(2, 2, dtype=torch.long),
        completion_mask=torch.ones(2, 1),
        group_ids=torch.zeros(2, dtype=torch.long),
        rewards=torch.zeros(2),
        answers=[None, "42"],  # what the rollout's final_answer gives
    )
    assert rollout_records(batch)[0]["correct"] == [False, True]
    assert rollout_records(batch, fallback="last_number")[0]["correct"] == [True, True]
    with pytest.raises(ValueError, match="answer_fallback='last_word'; valid: none, last_number, math_verify"):
        BenchmarkReport(answer_fallback="last_word")  # type: ignore[arg-type]


# ---------------------------------------------- issue 25.13: forms Math-Verify accepts, and near misses
@pytest.mark.parametrize(
    ("gold", "answer", "equal"),
    [
        ("12.5\\%", "12.5", True),  # a percentage stated without its sign
        ("12.5%", "12.5", True),
        ("12.5", "12.5\\%", True),
        ("12.5", "12.5 percent", True),
        ("12.5\\%", "13.5", False),
        ("12.5\\%", "125", False),
        ("2500", "2 500", True),  # space as thousands separator (Math-Verify alone reads 502)
        ("2500", "2\\,500", True),
        ("1234567", "1 234 567", True),
        ("2500", "2 501", False),
        ("3.75", "3,75", True),  # a decimal comma, against one number
        ("-0.5", "-0,5", True),
        ("375", "3,75", False),  # never 375
        ("3.7", "3,75", False),
        ("3.75", "3,750", False),  # three digits: the thousands reading, 3750
        ("3750", "3,750", True),
        ("3, 75", "3,75", True),  # against a list it stays a list
        ("42", "42\\", True),  # a trailing backslash (it escaped the closing "$" sent to Math-Verify)
        ("42", "42\\\\", True),
        ("41", "42\\", False),
    ],
)
def test_number_forms(gold: str, answer: str, equal: bool) -> None:
    assert answers_equivalent(gold, answer) is equal


def test_number_forms_in_boxes() -> None:
    assert grade_completion("math", "so \\boxed{42\\\\}", "42").correct  # "\boxed{42\\}": the box closes
    assert grade_completion("math", "\\boxed{2 500}", "2,500").correct
    assert grade_completion("math", "\\boxed{12.5}", "12.5\\%").correct
    assert not grade_completion("math", "\\boxed{3,75}", "375").correct
