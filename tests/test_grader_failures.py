"""A comparison Math-Verify gives no verdict on is reported as what happened, with its row: an exception (its type
and message), the grading process dying (its exit status), or a timeout (the time limit). Each is still scored as
before: not equivalent. The failures are planted in a real grading process (``planted_grader.py``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import lit_gcpo.rewards.answers as answers
import lit_gcpo.rewards.sandbox as sandbox
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation.grading import Grade, benchmark_correctness, grade_answer
from lit_gcpo.evaluation.results import missing_verdicts, rollout_records
from lit_gcpo.rewards.math_reward import math_accuracy

PLANTED = [sys.executable, "-I", str(Path(__file__).parent / "planted_grader.py"), sandbox.__file__]
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
    assert [r["grading_problems"] for r in records] == [[None, DIED], None]
    assert missing_verdicts(records) == {"math500/sampled": [f"item m-7 completion 1: {DIED}"]}
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.answers"):
        scores = benchmark_correctness(["p", "p"], ["\\boxed{13579}", "\\boxed{3}"], gold=["0.5", "3"], id=["a", "b"])
    assert scores == [0.0, 1.0]
    assert any(f"completion 0 (row id 'a') (answer '13579'): {RAISED}" in r.getMessage() for r in caplog.records)
