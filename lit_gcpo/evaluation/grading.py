"""Grading benchmark completions by the kind of their benchmark, as pure functions.

An empty last box (``\\boxed{}``) is no answer for either kind: it is graded wrong and never votes.

* math: the final answer is the content of the completion's last complete ``\\boxed{}``, with the boxes
  listed right before it (``lit_gcpo.rewards.answers.final_answer``: ``\\boxed{3}, \\boxed{5}`` is the answer
  ``3, 5``); a completion without a box has no answer unless a ``fallback`` reads one
  (``lit_gcpo.rewards.answers.read_unboxed``: the last number, or Math-Verify's extraction). It is correct when
  Math-Verify finds it equivalent to the gold (``lit_gcpo.rewards.answers.compare_answers``, gold first, the
  ``math_accuracy`` reward's time bound); a comparison without a verdict (timeout, exception, crash) is graded
  wrong and its reason kept in ``Grade.problem``, as is the reason of an extraction that gave no result (the
  completion then has no answer).
* qa: the answer is ``lit_gcpo.rewards.qa.extract_qa_answer`` (last box, else the text after the last
  "Answer:", else the whole completion); it is correct on a SQuAD exact match with any reference, and
  its token F1 is the best over the references.

Per prompt (project's reading, the rule of the semantic-entropy papers applied to k samples): the answer
the model reports is the *majority answer* of its completions (``lit_gcpo.evaluation.metrics.
majority_answer`` under the kind's equivalence: Math-Verify for math, equal SQuAD-normalised text for
QA); whether it is wrong is the label that the uncertainty signals are asked to predict (AUROC). With
one completion the majority answer is that completion's answer. A vote's comparison without a verdict counts as
not equivalent and is reported with the two completions (``majority_grade``'s ``on_no_verdict``).

``benchmark_correctness`` wraps the per-completion grade as a reward function (TRL convention), so that a
run mixing math and QA benchmarks has one accuracy reward valid for both kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lit_gcpo.algorithms.clustering import NoVerdict
from lit_gcpo.evaluation.metrics import Equivalence, majority_answer
from lit_gcpo.rewards.answers import (
    Verdict,
    answers_equivalent,
    compare_answers,
    final_answer,
    gold_answer,
    read_unboxed,
    report_missing_verdicts,
)
from lit_gcpo.rewards.math_reward import GRADING_TIMEOUT_S, completion_text, row_name
from lit_gcpo.rewards.qa import exact_match, extract_qa_answer, normalize_answer, references, token_f1

KINDS = ("math", "qa")


@dataclass(frozen=True)
class Grade:
    """One completion's grade: the extracted answer (None: none found), correctness and QA token F1; ``problem``:
    why Math-Verify gave no verdict (graded wrong; ``lit_gcpo.rewards.answers.Verdict``)."""

    answer: str | None
    correct: bool
    f1: float | None = None
    problem: str | None = None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"benchmark kind must be one of {KINDS}, got {kind!r}")


def math_equivalent(gold: str, answer: str) -> bool:
    """Math-Verify equivalence with the ``math_accuracy`` reward's time bound (timeout = not equivalent)."""
    return answers_equivalent(gold, answer, timeout_s=GRADING_TIMEOUT_S)


def qa_equivalent(a: str, b: str) -> bool:
    """Two QA answers agree when their SQuAD-normalised texts are equal."""
    return normalize_answer(a) == normalize_answer(b)


def equivalence(kind: str) -> Equivalence:
    """The answer equivalence of a benchmark kind (clusters answers and picks the majority): math's is
    ``math_verdict`` (a ``Verdict``: why Math-Verify gave none), QA's a bool."""
    _check_kind(kind)
    return math_verdict if kind == "math" else qa_equivalent


def math_verdict(gold: str, answer: str) -> Verdict:
    """``math_equivalent`` with why there is no verdict (``lit_gcpo.rewards.answers.Verdict``)."""
    return compare_answers(gold, answer, GRADING_TIMEOUT_S)


def gold_references(kind: str, gold: Any) -> list[str]:
    """The gold as a list of strings: one normalised math answer, or the QA references (empty: none)."""
    _check_kind(kind)
    if kind == "math":
        text = gold_answer(gold)
        return [text] if text is not None else []
    return references(gold)


def no_blank(answer: str | None) -> str | None:
    """An answer, or None for no answer: an empty ``\\boxed{}`` states nothing, for math as for QA."""
    return answer if answer is not None and answer.strip() else None


def extract_answer(kind: str, completion: str, fallback: str = "none") -> str | None:
    """The final answer a completion states, None if empty: ``read_answer``'s answer."""
    return read_answer(kind, completion, fallback)[0]


def read_answer(kind: str, completion: str, fallback: str = "none") -> tuple[str | None, str | None]:
    """The final answer a completion states (None if empty), and why a fallback's extraction gave none (None: no
    failure).

    math: ``final_answer`` (the last box and the boxes listed with it); without a box, ``read_unboxed``
    by ``fallback`` (``none``, ``last_number``, ``math_verify``). QA: ``extract_qa_answer``.
    """
    _check_kind(kind)
    if kind == "qa":
        return no_blank(extract_qa_answer(completion)), None
    boxed = final_answer(completion)
    if boxed is not None:
        return no_blank(boxed), None
    extraction = read_unboxed(completion, fallback, GRADING_TIMEOUT_S)
    return no_blank(extraction.answer), extraction.problem


def grade_answer(kind: str, answer: str | None, gold: Any) -> Grade:
    """Grade an extracted answer against the gold (math: equivalence; QA: best EM and F1 over references)."""
    refs = gold_references(kind, gold)
    if kind == "math":
        if answer is None or not refs:
            return Grade(answer, False)
        verdict = compare_answers(refs[0], answer, GRADING_TIMEOUT_S)
        return Grade(answer, verdict.equal, problem=verdict.problem)
    if answer is None or not refs:
        return Grade(answer, False, 0.0)
    em = max(exact_match(answer, ref) for ref in refs)
    return Grade(answer, em == 1.0, max(token_f1(answer, ref) for ref in refs))


def grade_completion(kind: str, completion: str, gold: Any, fallback: str = "none") -> Grade:
    """Extract the answer of one completion (``fallback``: see ``read_answer``) and grade it; an extraction without
    a result is the grade's ``problem``."""
    answer, problem = read_answer(kind, completion, fallback)
    grade = grade_answer(kind, answer, gold)
    return grade if problem is None else replace(grade, problem=problem)


def majority_grade(
    kind: str, answers: Sequence[str | None], gold: Any, on_no_verdict: NoVerdict | None = None
) -> Grade:
    """The majority answer of one prompt's completions, graded (no answer at all: incorrect). A vote's comparison
    without a verdict goes to ``on_no_verdict(position, other position, why)`` (None: a warning)."""
    winner = majority_answer(list(answers), equivalence(kind), on_no_verdict)
    return grade_answer(kind, winner, gold)


def majority_and_problems(
    kind: str, gold: Any, grades: list[Grade], also: Sequence[Sequence[str]] = ()
) -> tuple[Grade, list[str | None] | None]:
    """The majority grade of one item's completions, and per completion why its grading got no verdict or result
    (its own grade's problem, the majority vote's comparisons placing it, the majority answer's against the gold,
    then ``also``'s lines of it, e.g. the answer clustering's), ``"; "``-joined; None when nothing failed."""
    problems: list[list[str]] = [[grade.problem] if grade.problem else [] for grade in grades]

    def vote_problem(position: int, other: int, why: str) -> None:
        problems[position].append(f"majority vote, against completion {other}: {why}")

    majority = majority_grade(kind, [grade.answer for grade in grades], gold, vote_problem)
    if majority.problem is not None:
        winner = next(j for j, grade in enumerate(grades) if grade.answer == majority.answer)
        problems[winner].append(f"majority answer, against the gold: {majority.problem}")
    for lines, more in zip(problems, also or [[]] * len(grades), strict=True):
        lines.extend(more)
    joined = ["; ".join(lines) or None for lines in problems]
    return majority, joined if any(joined) else None


def benchmark_correctness(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """Reward: 1.0 when the completion is correct for its row's ``kind`` against the row's ``gold``.

    Rows without ``kind`` are graded as math; rows whose gold cannot be read get None (no score).
    """
    kinds = columns.get("kind") or ["math"] * len(completions)
    golds = columns.get("gold") or [None] * len(completions)
    scores: list[float | None] = []
    problems: list[str] = []
    for index, (completion, kind, gold) in enumerate(zip(completions, kinds, golds, strict=True)):
        kind = kind or "math"
        if not gold_references(kind, gold):
            scores.append(None)
            continue
        grade = grade_completion(kind, completion_text(completion), gold)
        if grade.problem is not None:
            problems.append(f"{row_name(index, columns)} (answer {grade.answer!r:.80}): {grade.problem}")
        scores.append(float(grade.correct))
    report_missing_verdicts("benchmark_correctness", problems, len(completions))
    return scores
