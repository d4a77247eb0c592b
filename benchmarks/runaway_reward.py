"""The runaway reward function of ``bench_runaway_reward.py``, in a module that imports nothing heavy (the
process that runs it imports this module, and a restart pays that import)."""

from __future__ import annotations

CALLS = {"n": 0}


def spin_some(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    """Digit fraction of each completion; every 3rd call (in this process) spins forever instead."""
    CALLS["n"] += 1
    if CALLS["n"] % 3 == 0:
        while True:
            pass
    return well_behaved(prompts, completions)


def well_behaved(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
