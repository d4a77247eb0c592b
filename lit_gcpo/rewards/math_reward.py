"""Rule-based math rewards: the final ``\\boxed{}`` answer against the gold, by Math-Verify equivalence.

``math_accuracy`` is the binary verifiable reward of DeepSeekMath's GRPO setting (and of SEED-GRPO /
GCPO): 1 when the completion's final answer is equivalent to the gold, else 0. Project's reading: the
final answer is the content of the completion's last complete ``\\boxed{}``/``\\fbox{}``, with the boxes
listed right before it (``lit_gcpo.rewards.answers.final_answer``: ``\\boxed{3} or \\boxed{5}`` is the answer
``3, 5``, so hedging between boxes earns nothing) (none -> 0);
a completion whose gold cannot be read gets ``None`` (no score), not 0.
"""

from __future__ import annotations

from typing import Any

from lit_gcpo.rewards.answers import (
    Verdict,
    compare_answers,
    ends_with_box,
    extract_boxed,
    final_answer,
    gold_answer,
    report_missing_verdicts,
)
from lit_gcpo.rewards.loading import REWARDS, reads_gold

GRADING_TIMEOUT_S = 1.0
"""Seconds one Math-Verify comparison may take (real answers take milliseconds). A comparison without a verdict (a
timeout, an exception in Math-Verify, the grading process dying on it) scores 0 and is reported with its row."""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return "" if completion is None else str(completion)


def _row_gold(index: int, columns: dict[str, list[Any]]) -> str | None:
    """Gold of row ``index``: ``gold``, else ``answer``, else ``final_answer``, else the box of ``solution``."""
    for field in ("gold", "answer", "final_answer"):
        values = columns.get(field)
        if values is not None and values[index] is not None:
            gold = gold_answer(values[index])
            if gold is not None:
                return gold
    solutions = columns.get("solution")
    if solutions is not None and isinstance(solutions[index], str):
        return extract_boxed(solutions[index])
    return None


@REWARDS.register("math_accuracy")
@reads_gold
def math_accuracy(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """1.0 when the last ``\\boxed{}`` of the completion is equivalent to the gold, else 0.0.

    The gold comes from the ``gold`` column (evaluation items) or the ``answer`` column (any format
    ``lit_gcpo.rewards.answers.gold_answer`` reads: LaTeX, numbers, GSM8K ``#### n``, solutions with a box,
    lists), else ``final_answer`` (OlympiadBench), else the last box of ``solution`` (Minerva); ``None``
    for a row without a readable gold.
    """
    scores: list[float | None] = []
    problems: list[str] = []  # comparisons without a verdict, by row
    for index, completion in enumerate(completions):
        gold = _row_gold(index, columns)
        if gold is None:
            scores.append(None)
            continue
        predicted = final_answer(completion_text(completion))
        verdict = Verdict(False) if predicted is None else compare_answers(gold, predicted, GRADING_TIMEOUT_S)
        if verdict.problem is not None:
            problems.append(f"{row_name(index, columns)} (gold {gold!r}, answer {predicted!r:.80}): {verdict.problem}")
        scores.append(1.0 if verdict.equal else 0.0)
    report_missing_verdicts("math_accuracy", problems, len(completions))
    return scores


def row_name(index: int, columns: dict[str, list[Any]]) -> str:
    """How a report names completion ``index`` of a batch: its position, and its row's ``id`` when it has one."""
    ids = columns.get("id")
    return f"completion {index}" + (f" (row id {ids[index]!r})" if ids and ids[index] is not None else "")


@REWARDS.register("math_accuracy_final")
@reads_gold
def math_accuracy_final(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """``math_accuracy``, and 0 unless the completion ends with that box (only whitespace after it).

    For tasks whose completions stop at their answer (the arithmetic quickstart): text after the box is
    junk, and a reward that ignored it let the policy learn to pad every completion to the length limit
    (``\\boxed{6}0}000...``, issue 11). Real math completions often close with a sentence after the box;
    keep ``math_accuracy`` for them.
    """
    scores = math_accuracy(prompts, completions, **columns)
    return [
        score if score is None or ends_with_box(completion_text(completion)) else 0.0
        for score, completion in zip(scores, completions, strict=True)
    ]


@REWARDS.register("format")
def format_reward(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """1.0 when the completion states a final answer in a complete, non-empty ``\\boxed{}``, else 0.0."""
    return [1.0 if extract_boxed(completion_text(c)) else 0.0 for c in completions]
