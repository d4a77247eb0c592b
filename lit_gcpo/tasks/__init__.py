"""Prompt sources with verifiable answers (synthetic tasks shipped with the package)."""

from __future__ import annotations

from lit_gcpo.tasks.arithmetic import (
    DEFAULT_MIX,
    WARM_START_MIX,
    ArithmeticProblem,
    ArithmeticTask,
    arithmetic_splits,
    sample_problems,
)

__all__ = [
    "DEFAULT_MIX",
    "WARM_START_MIX",
    "ArithmeticProblem",
    "ArithmeticTask",
    "arithmetic_splits",
    "sample_problems",
]
