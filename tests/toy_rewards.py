"""Reward functions for tests: they give groups a reward spread even under a random policy."""

from __future__ import annotations


def digit_fraction(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """The fraction of a completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def always_nan(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [float("nan")] * len(completions)
