"""Reward functions (TRL convention) and their robust, weighted combination.

``fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]``: columns are the
dataset rows' fields as lists. Built-ins are registered by name in ``REWARDS``; anything else is loaded
by dotted path (``pkg.module:function``); a learned reward model is a ``RewardModel``. ``RewardSet`` scores a
batch with several of them under a time bound (a user's function in its own killable process) and turns failures
into counted NaN scores.
"""

from __future__ import annotations

from lit_gcpo.rewards.combine import (
    MAX_ABS_SCORE,
    MAX_STUCK_CALLS,
    CombinedReward,
    RewardError,
    RewardScores,
    RewardSet,
    RewardTerm,
)
from lit_gcpo.rewards.isolated import ProcessReward
from lit_gcpo.rewards.loading import REWARDS, RewardFn, import_object, load_reward
from lit_gcpo.rewards.math_reward import (
    GRADING_TIMEOUT_S,
    completion_text,
    format_reward,
    math_accuracy,
    math_accuracy_final,
)
from lit_gcpo.rewards.qa import extract_qa_answer, normalize_answer, qa_exact_match, qa_f1, token_f1
from lit_gcpo.rewards.reward_model import RewardModel, reward_name

__all__ = [
    "GRADING_TIMEOUT_S",
    "MAX_ABS_SCORE",
    "MAX_STUCK_CALLS",
    "REWARDS",
    "CombinedReward",
    "ProcessReward",
    "RewardError",
    "RewardFn",
    "RewardModel",
    "RewardScores",
    "RewardSet",
    "RewardTerm",
    "completion_text",
    "extract_qa_answer",
    "format_reward",
    "import_object",
    "load_reward",
    "math_accuracy",
    "math_accuracy_final",
    "normalize_answer",
    "qa_exact_match",
    "qa_f1",
    "reward_name",
    "token_f1",
]
