"""A comparison Math-Verify gives no verdict on is reported as what happened, with its row: an exception (its type
and message), the grading process dying (its exit status), or a timeout (the time limit). Each is still scored as
before: not equivalent. So is an extraction (the ``math_verify`` fallback) that gives no result (still: no answer),
and a comparison of the answer clustering or of the majority vote. The failures are planted in a real grading
process (``planted_grader.py``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import lit_gcpo.rewards.answers as answers
import lit_gcpo.rewards.sandbox as sandbox
from lit_gcpo.algorithms.clustering import answer_clusters
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation.grading import Grade, benchmark_correctness, grade_answer
from lit_gcpo.evaluation.results import missing_verdicts, rollout_records, summarise
from lit_gcpo.rewards import grading_process
from lit_gcpo.rewards.math_reward import math_accuracy

PLANTED = [sys.executable, "-I", str(Path(__file__).parent / "planted_grader.py"), grading_process.__file__]
RAISED = "Math-Verify raised ValueError: planted failure in verify for 13579"
DIED = "the grading process exited with code 3 during the comparison"
TIMED_OUT = "timed out after 1 s (the time limit of one Math-Verify comparison)"
HUGE = "9^{9^{9^{9}}}"  # Math-Verify expands it in C code, past any time limit


def _planted_worker() -> sandbox.GraderProcess:
    worker = sandbox.GraderProcess()
    worker.command = PLANTED
    return worker


@pytest.fixture
def planted_pool(monkeypatch):
    pool = sandbox.GraderPool(num_workers=1)
    for worker in pool._all:
        worker.command = PLANTED
    monkeypatch.setattr(answers, "default_pool", lambda: pool)
    yield pool
    pool.close()


def test_the_grading_process_reports_an_exception_a_crash_and_a_timeout_apart():
    worker = _planted_worker()
    try:
        assert worker.grade("\\frac{1}{2}", "0.5", timeout_s=10.0) == sandbox.GradeResult(True)  # Math-Verify's own
        first = worker.pid
        raised = worker.grade("1", "13579", timeout_s=10.0)
        assert raised == sandbox.GradeResult(False, timed_out=False, error=RAISED)
        assert worker.pid == first  # an exception leaves the process serving
        died = worker.grade("1", "24680", timeout_s=10.0)
        assert died == sandbox.GradeResult(False, timed_out=False, error=DIED)  # was: timed_out=True
        assert worker.pid != first  # replaced
        slow = worker.grade("5", HUGE, timeout_s=1.0)
        assert slow == sandbox.GradeResult(False, timed_out=True, error=None)
        assert worker.grade("\\frac{3}{6}", "0.5", timeout_s=10.0).equal  # and it serves on
    finally:
        worker.close()


def test_math_accuracy_scores_each_missing_verdict_zero_and_reports_it_with_its_row(planted_pool, caplog):
    completions = ["so \\boxed{0.5}", "\\boxed{13579}", f"\\boxed{{{HUGE}}}", "\\boxed{24680}"]
    # golds that are no plain integers: two integers are compared without Math-Verify
    columns = {"answer": ["\\frac{1}{2}", "\\frac{1}{2}", "5", "\\frac{1}{3}"], "id": ["q0", "q1", "q2", "q3"]}
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        scores = math_accuracy(["p"] * 4, completions, **columns)
    assert scores == [1.0, 0.0, 0.0, 0.0]  # scored as before: no verdict is not equivalent
    (warning,) = [r.getMessage() for r in caplog.records if "no Math-Verify verdict" in r.getMessage()]
    assert warning.startswith("math_accuracy: no Math-Verify verdict for 3 of 4 completions, scored as not equivalent")
    assert f"completion 1 (row id 'q1') (gold '\\\\frac{{1}}{{2}}', answer '13579'): {RAISED}" in warning
    assert f"completion 2 (row id 'q2') (gold '5', answer '{HUGE}'): {TIMED_OUT}" in warning
    assert f"completion 3 (row id 'q3') (gold '\\\\frac{{1}}{{3}}', answer '24680'): {DIED}" in warning
    assert "completion 0" not in warning


def test_evaluation_grades_keep_the_reason_and_the_report_names_the_item(planted_pool, caplog):
    grade = grade_answer("math", "13579", "\\frac{1}{2}")
    assert (grade.correct, grade.problem) == (False, RAISED)
    assert grade_answer("math", "0.5", "\\frac{1}{2}") == Grade("0.5", True)  # a verdict: no problem
    rows = [{"id": "m-7", "kind": "math", "benchmark": "math500", "variant": "sampled", "gold": "\\frac{1}{3}"}]
    rows.append({"id": "m-8", "kind": "math", "benchmark": "math500", "variant": "sampled", "gold": "0.5"})
    batch = RolloutBatch(
        prompts=["p", "q"],
        rows=rows,
        completions=["\\boxed{\\frac{2}{6}}", "\\boxed{24680}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"],
        input_ids=torch.zeros(4, 2, dtype=torch.long),
        attention_mask=torch.ones(4, 2, dtype=torch.long),
        completion_mask=torch.ones(4, 1),
        group_ids=torch.tensor([0, 0, 1, 1]),
        rewards=torch.zeros(4),
        answers=["\\frac{2}{6}", "24680", "0.5", "\\frac{1}{2}"],
    )
    records = rollout_records(batch)
    assert [r["correct"] for r in records] == [[True, False], [True, True]]  # the crash graded wrong, as before
    # completion 1 crashed the grading process twice: against the gold, and in the majority vote against completion 0
    both = f"{DIED}; majority vote, against completion 0: {DIED}"
    assert [r["grading_problems"] for r in records] == [[None, both], None]
    assert missing_verdicts(records) == {"math500/sampled": [f"item m-7 completion 1: {both}"]}
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        scores = benchmark_correctness(["p", "p"], ["\\boxed{13579}", "\\boxed{3}"], gold=["0.5", "3"], id=["a", "b"])
    assert scores == [0.0, 1.0]
    assert any(f"completion 0 (row id 'a') (answer '13579'): {RAISED}" in r.getMessage() for r in caplog.records)


# ------------------------------------------- the extraction fallback and the answer clustering / majority vote
EXTRACT_RAISED = "Math-Verify raised ValueError: planted failure in parse for EXTRACT-RAISES"
EXTRACT_DIED = "the grading process exited with code 3 during the extraction"
EXTRACT_TIMED_OUT = "extraction timed out after 1 s (the time limit of one Math-Verify call)"
SLEPT = "timed out after 1 s (the time limit of one Math-Verify comparison)"  # verify planted to sleep on 97531


def _one_item(rows: list[dict], completions: list[str], answers_: list[str] | None = None) -> RolloutBatch:
    """A rollout batch of one prompt and its completions (one token each; the grading reads only the texts)."""
    n = len(completions)
    return RolloutBatch(
        prompts=["p"],
        rows=rows,
        completions=completions,
        input_ids=torch.zeros(n, 2, dtype=torch.long),
        attention_mask=torch.ones(n, 2, dtype=torch.long),
        completion_mask=torch.ones(n, 1),
        group_ids=torch.zeros(n, dtype=torch.long),
        rewards=torch.zeros(n),
        answers=answers_,
    )


def test_the_grading_process_reports_a_failed_extraction_apart_from_finding_nothing():
    worker = _planted_worker()
    try:
        assert worker.extract("so the final answer is $\\frac{1}{2}$", timeout_s=10.0).answer == "\\frac{1}{2}"
        assert worker.extract("no mathematics here", timeout_s=10.0) == sandbox.ExtractResult(None)  # found nothing
        first = worker.pid
        raised = worker.extract("EXTRACT-RAISES: the answer is $3$", timeout_s=10.0)
        assert raised == sandbox.ExtractResult(None, error=EXTRACT_RAISED)  # was: None, as if nothing was found
        slow = worker.extract("EXTRACT-SLEEPS: the answer is $3$", timeout_s=1.0)
        assert slow == sandbox.ExtractResult(None, timed_out=True)
        assert worker.pid == first  # an exception and a Python-level timeout leave the process serving
        died = worker.extract("EXTRACT-DIES: the answer is $3$", timeout_s=10.0)
        assert died == sandbox.ExtractResult(None, error=EXTRACT_DIED)
        assert worker.pid != first  # replaced, and it serves on
        assert worker.extract("the final answer is $7$", timeout_s=10.0).answer == "7"
    finally:
        worker.close()


def test_evaluation_reports_failed_extractions_with_the_item_and_counts_them(planted_pool):
    rows = [{"id": "m-1", "kind": "math", "benchmark": "math500", "gold": "7"}]
    completions = ["the answer is $7$", "EXTRACT-RAISES $7$", "EXTRACT-SLEEPS $7$", "EXTRACT-DIES $7$"]
    (record,) = rollout_records(_one_item(rows, completions), fallback="math_verify")  # no box: the fallback reads
    # the verdicts as before: the failed extractions give no answer, graded wrong; the vote is the first answer's
    assert (record["answers"], record["correct"]) == (["7", None, None, None], [True, False, False, False])
    assert (record["majority_answer"], record["majority_correct"]) == ("7", True)
    assert record["grading_problems"] == [None, EXTRACT_RAISED, EXTRACT_TIMED_OUT, EXTRACT_DIED]
    assert missing_verdicts([record])["math500"][2] == f"item m-1 completion 3: {EXTRACT_DIED}"
    summary = summarise([record])["math500"]
    assert summary["no_verdict"] == 3.0  # completions with a failed grading step; absent when none failed
    assert "no_verdict" not in summarise([{**record, "grading_problems": None}])["math500"]


def test_a_majority_vote_comparison_without_a_verdict_is_reported_with_both_completions(planted_pool, caplog):
    # gold 3 and the answers 24680 / 97531 are plain integers, compared without Math-Verify: only the comparisons of
    # 0.5 (completion 0, the first class) with them reach the planted grading process, in the vote and in the
    # clustering of the signals (the same pairs: a comparison without a verdict is not cached)
    rows = [{"id": "v-1", "kind": "math", "benchmark": "toy", "gold": "3"}]
    answers_ = ["0.5", "24680", "97531", "\\frac{1}{2}"]
    (record,) = rollout_records(_one_item(rows, [f"\\boxed{{{a}}}" for a in answers_], answers_))
    # unchanged verdicts: the failed comparisons are "not equivalent", so 0.5 and \frac{1}{2} win with 2 votes
    assert record["correct"] == [False] * 4
    assert record["majority_answer"] == "0.5" and not record["majority_correct"]
    assert record["signals"]["num_clusters"] == 3.0  # the clustering of the signals: {0.5, 1/2}, 24680, 97531
    assert record["grading_problems"] == [
        None,
        f"majority vote, against completion 0: {DIED}; answer clustering, against completion 0: {DIED}",
        f"majority vote, against completion 0: {SLEPT}; answer clustering, against completion 0: {SLEPT}",
        None,
    ]
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        summary = summarise([record])["toy"]
    assert summary["no_verdict"] == 2.0 and summary["maj@4"] == 0.0  # completions; the vote counted again: wrong
    # maj@4 votes again from the answers (the failures were not cached): the same two comparisons, warned about
    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("maj@4")]
    assert warning.startswith("maj@4: no Math-Verify verdict for 2 comparisons of 4 completions")
    assert f"problem 0, answer 1 against 0: {DIED}" in warning and f"problem 0, answer 2 against 0: {SLEPT}" in warning


def test_answer_clustering_reports_a_comparison_without_a_verdict(planted_pool, caplog):
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    answers_ = ["0.5", "13579", "\\frac{1}{2}", "0.25", "24680"]
    reported = []
    ids = answer_clusters(answers_, group_ids, on_no_verdict=lambda *args: reported.append(args))
    assert ids.tolist() == [0, 1, 0, 0, 1]  # the failed comparisons: not equivalent, as before
    assert reported == [(1, 0, RAISED), (4, 3, DIED)]
    # without a sink (the training pipeline's call): one warning naming the completions and their groups
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        assert answer_clusters(answers_, group_ids).tolist() == [0, 1, 0, 0, 1]
    (warning,) = [r.getMessage() for r in caplog.records if "answer clustering" in r.getMessage()]
    assert warning.startswith("answer clustering: no Math-Verify verdict for 2 comparisons of 5 completions")
    assert f"completion 1 (group 0) against 0: {RAISED}" in warning
    assert f"completion 4 (group 1) against 3: {DIED}" in warning


def test_a_stub_equivalence_without_verdicts_reaches_the_vote_and_the_clustering_sinks():
    """No grading process: an equivalence that answers ``Verdict(False, why)`` for one pair."""
    from lit_gcpo.evaluation.metrics import majority_answer

    def stub(a: str, b: str) -> answers.Verdict:
        if {a, b} == {"x", "y"}:
            return answers.Verdict(False, "timed out after 1 s (stub)")
        return answers.Verdict(a.upper() == b.upper())

    seen = []
    assert majority_answer(["x", "y", "Y", "X", "X"], stub, lambda *a: seen.append(a)) == "x"  # 3 votes to 2
    assert seen == [(1, 0, "timed out after 1 s (stub)")]  # Y and X matched their class without a failure
    seen.clear()
    ids = answer_clusters(["x", "y", "Y"], torch.zeros(3, dtype=torch.long), stub, lambda *a: seen.append(a))
    assert ids.tolist() == [0, 1, 1] and seen == [(1, 0, "timed out after 1 s (stub)")]


def test_evaluation_clustering_names_the_batch_positions_of_a_comparison_without_a_verdict(monkeypatch, caplog):
    """Mixed kinds: the math groups are clustered apart from the QA ones, so a failure's positions must be mapped
    back from the math subset to the batch. No grading process: ``math_verdict`` answers ``Verdict(False, why)`` for
    one pair."""
    import lit_gcpo.evaluation.grading as grading
    from lit_gcpo.evaluation.calibration import kind_answer_clusters

    def stub(a: str, b: str) -> answers.Verdict:
        if {a, b} == {"x", "y"}:
            return answers.Verdict(False, "timed out after 1 s (stub)")
        return answers.Verdict(a.upper() == b.upper())

    monkeypatch.setattr(grading, "math_verdict", stub)
    texts = ["cat", "Cat", "x", "y", "Y", "dog"]  # qa, qa | math x3 | qa
    group_ids, kinds = torch.tensor([0, 0, 1, 1, 1, 2]), ["qa", "math", "qa"]
    seen = []
    ids = kind_answer_clusters(texts, group_ids, kinds, lambda *report: seen.append(report))
    assert ids.tolist() == [0, 0, 0, 1, 1, 0]  # y not equivalent to x (no verdict), Y joins y
    assert seen == [(3, 2, "timed out after 1 s (stub)")]  # batch positions, not the math subset's 1 and 0
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        assert kind_answer_clusters(texts, group_ids, kinds).tolist() == [0, 0, 0, 1, 1, 0]
    (warning,) = [r.getMessage() for r in caplog.records if "answer clustering" in r.getMessage()]
    assert warning.startswith("answer clustering: no Math-Verify verdict for 1 comparisons of 6 completions")
    assert "completion 3 (group 1) against 2: timed out after 1 s (stub)" in warning
