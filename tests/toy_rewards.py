"""Reward functions for tests: they give groups a reward spread even under a random policy."""

from __future__ import annotations


def digit_fraction(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """The fraction of a completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def always_nan(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [float("nan")] * len(completions)


def digit_fraction_for_odd_answers(
    prompts: list[str], completions: list[str], answer: list | None = None, **columns: list
) -> list[float | None]:
    """``digit_fraction`` where the gold answer is odd, 0 where it is even: the groups of even-answer prompts have
    no reward spread whatever the policy samples (dynamic sampling drops them)."""
    answers = answer if answer is not None else [None] * len(completions)
    fractions = digit_fraction(prompts, completions)
    odd = [gold is not None and int(gold) % 2 == 1 for gold in answers]
    return [value if keep else 0.0 for value, keep in zip(fractions, odd, strict=True)]
