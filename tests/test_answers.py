"""Answer extraction, gold normalisation and the time-bounded Math-Verify equivalence."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import pytest

from lit_gcpo.rewards.answers import answers_equivalent, extract_boxed, gold_answer, unboxed_answer
from lit_gcpo.rewards.sandbox import GraderProcess, default_pool

_fresh = itertools.count(2)


def _warm_grader() -> None:
    """One comparison the fast paths and the cache cannot answer, so the grading process is up."""
    k = next(_fresh)
    assert answers_equivalent("1", f"\\frac{{{k}}}{{{k}}}", timeout_s=10.0)


# ----------------------------------------------------------------------------------- extract_boxed
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no box here", None),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} and \\fbox{x}", "x"),
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed {  5 }", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),  # last box unclosed -> previous box
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed{}", ""),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extract_boxed_on_deep_nesting_and_huge_text() -> None:
    nested = "{" * 10_000 + "1" + "}" * 10_000
    assert extract_boxed(f"\\boxed{{{nested}}}") == nested
    huge = "x " * 500_000 + "\\boxed{42}" + " y" * 500_000
    assert extract_boxed(huge) == "42"
    unbalanced = "\\boxed{" * 20_000  # 20,000 open boxes, none complete
    assert extract_boxed(unbalanced) is None


# ------------------------------------------------------------------------------------- gold_answer
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\\frac{5}{13}", "\\frac{5}{13}"),  # MATH-500 LaTeX string
        ("025", "25"),  # AIME leading zeros
        ("080", "80"),
        (27.0, "27"),  # AMC23 floats
        (0.5, "0.5"),
        (12, "12"),
        (["$x^2+1$"], "x^2+1"),  # OlympiadBench final_answer
        (["16"], "16"),
        (["$1$", "$2$"], "1, 2"),
        ("so $E = \\boxed{10.1}$.", "10.1"),  # Minerva: the gold is a full solution
        ("Dora is 9\nSo he will be 8\n#### 8", "8"),  # GSM8K
        ("It costs 1,000+234\n#### 1,234", "1234"),
        ("$\\pi$", "\\pi"),
        (None, None),
        (float("nan"), None),
        ("", None),
        ([], None),
        (True, None),
        ("a solution with no box and no mark", "a solution with no box and no mark"),
    ],
)
def test_gold_answer(value: object, expected: str | None) -> None:
    assert gold_answer(value) == expected


# ------------------------------------------------------------------------------ answers_equivalent
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\frac12", "0.5"),
        ("\\frac12", "1/2"),
        ("0.5", "\\dfrac{1}{2}"),
        ("\\frac{5}{13}", "5/13"),
        ("080", "80"),
        ("27", "27.0"),
        ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)"),
        ("4.6e-24", "4.6 \\times 10^{-24}"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("x = 5", "5"),
    ],
)
def test_equivalent_forms(a: str, b: str) -> None:
    assert answers_equivalent(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\frac12", "0.6"), ("5", "6"), ("\\sqrt{8}", "3\\sqrt{2}"), ("(2,12)", "[2,12]"), ("1", ""), ("", "")],
)
def test_not_equivalent(a: str, b: str) -> None:
    assert not answers_equivalent(a, b)


def test_equivalence_from_a_worker_thread() -> None:
    # Math-Verify's own signal.alarm timeout raises ValueError outside the main thread; ours must not.
    results: list[bool] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(answers_equivalent("\\frac{3}{6}", "0.5"))
            results.append(answers_equivalent("\\frac{3}{6}", "0.25"))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert errors == []
    assert results == [True, False]


def test_python_code_is_never_evaluated(tmp_path) -> None:
    target = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {target}')",
        f'__import__("os").system("touch {target}")',
        f"eval(\"__import__('os').system('touch {target}')\")",
    ]
    for payload in payloads:
        assert not answers_equivalent("0", payload)
        assert not answers_equivalent(payload, "0")
        for fallback in ("last_number", "math_verify"):  # reading an unboxed completion runs nothing either
            unboxed_answer(f"The final answer is {payload}", fallback)
    assert not target.exists()


def test_huge_exponent_times_out_promptly_and_the_grader_recovers() -> None:
    timeout = 1.0
    _warm_grader()
    start = time.monotonic()
    assert not answers_equivalent("5", "9^{9^{9^{9}}}", timeout_s=timeout)
    assert time.monotonic() - start < 3 * timeout  # a safety property, not a benchmark
    _warm_grader()  # a replacement process answers afterwards


def test_grader_process_kills_a_hung_child_and_restarts() -> None:
    # A C-level hang never returns to the interpreter, so the child's own alarm cannot fire; SIGSTOP
    # freezes the child the same way. The parent must give up on time, kill it and serve the next
    # request from a new process.
    worker = GraderProcess()
    try:
        assert worker.grade("1", "1", timeout_s=1.0).equal  # started and ready
        frozen = worker.pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        start = time.monotonic()
        result = worker.grade("\\frac{1}{2}", "0.5", timeout_s=1.0)
        assert time.monotonic() - start < 3 * 1.0
        assert result.timed_out and not result.equal and result.error is None  # still running at the bound
        assert worker.pid != frozen
        assert worker.grade("\\frac{1}{2}", "0.5", timeout_s=5.0).equal
    finally:
        worker.close()


def _grade_in_child(queue) -> None:
    results = (answers_equivalent("\\frac{6}{12}", "0.5"), answers_equivalent("\\frac{6}{12}", "0.7"))
    queue.put((results, default_pool().pids))


def test_forked_child_gets_its_own_grading_process() -> None:
    # A forked dataloader worker must not write into the parent's pipes (the replies would be mixed).
    import multiprocessing

    _warm_grader()  # the parent's process exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_grade_in_child, args=(queue,))
    child.start()
    child_results, child_pids = queue.get(timeout=60)
    child.join(60)
    assert child_results == (True, False)
    assert set(child_pids).isdisjoint(default_pool().pids)
    assert answers_equivalent("\\frac{7}{14}", "0.5") and not answers_equivalent("\\frac{7}{14}", "0.7")


def test_grader_process_crash_mid_request_is_a_no_verdict_not_an_error() -> None:
    # A child that dies on an input (here: killed while expanding a huge power) must not raise: that
    # comparison gets no verdict, reported as the crash it is (not as a timeout), and the next one is served by
    # a replacement.
    worker = GraderProcess()
    try:
        assert worker.grade("1", "1", timeout_s=1.0).equal
        crashed = worker.pid
        assert crashed is not None
        results = []
        thread = threading.Thread(target=lambda: results.append(worker.grade("5", "(x+1)^{100000}", timeout_s=20.0)))
        start = time.monotonic()
        thread.start()
        time.sleep(0.3)
        os.kill(crashed, signal.SIGKILL)
        thread.join(30)
        assert time.monotonic() - start < 10.0  # returned on the crash, not at the 20 s bound
        assert not results[0].timed_out and not results[0].equal
        assert results[0].error == (
            "the grading process was killed by signal 9 (SIGKILL: what the kernel's out-of-memory killer sends) "
            "during the comparison"
        )
        assert worker.pid != crashed
        assert worker.grade("\\frac{1}{2}", "0.5", timeout_s=5.0).equal
    finally:
        worker.close()
