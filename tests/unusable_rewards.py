"""Reward functions that misbehave, loaded by dotted path in tests (``unusable_rewards:<name>``)."""

from __future__ import annotations


def spin_forever(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """Stuck in a pure-Python CPU loop (holds the interpreter; no timeout inside can stop it)."""
    count = 0
    while True:
        count += 1


def always_fails(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    raise ValueError("the grader's server is down")


def length_or_spin(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """The completions' lengths, except for a batch containing the completion ``"spin"``."""
    if "spin" in completions:
        spin_forever(prompts, completions)
    return [float(len(c)) for c in completions]


def chatty(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """Prints to stdout (the channel the parent reads replies from) and returns the answers' lengths."""
    print("scoring", len(completions), "completions\n{not a reply}")
    return [float(len(a or "")) for a in columns["answer"]]


def exit_or_length(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """The completions' lengths; a batch containing ``"exit"`` ends the process with ``os._exit(3)`` and one
    containing ``"oom"`` with SIGKILL, what the kernel's out-of-memory killer sends."""
    import os
    import signal

    if "exit" in completions:
        os._exit(3)
    if "oom" in completions:
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(len(c)) for c in completions]
