"""``data.label_free``: training without gold answers (TTRL, EMPO, Intuitor's self-certainty, RENT; METHODS.md §7).

The rewards are ``lit_gcpo.algorithms.label_free``'s pure functions; this module is their plumbing in the rollout
pipeline, which the ``RolloutDataModule`` calls at three points:

- ``label_free_problem`` at construction (and by ``lit-gcpo`` at parse time): the settings a label-free run cannot
  honour. ``data.rewards`` are then the *extra* training rewards, added to the label-free one, and none of them may
  read a gold answer (``lit_gcpo.rewards.loading.reads_gold``); ``data.accuracy_reward`` grades evaluation against
  the evaluation sets' golds and need not be in ``data.rewards``.
- ``reward_sets``: the training reward set (the extras, or none: ``Unscored``) and the evaluation one (the accuracy
  reward and the extras).
- ``apply_label_free`` after the scoring pass of a training batch: the label-free reward from the batch's answer
  clusters (``ttrl``, ``empo``) or its token-distribution summaries (``self_certainty``, ``rent``: the trainer's
  policy at the loss temperature, whatever the engine), written into ``batch.rewards`` (plus the extras) and
  ``batch.reward_components[<name>]``, its metrics into ``batch.metrics`` as ``label_free/<metric>``.

No training row needs a gold field, and no reward of a training batch reads one; evaluation rows still need theirs
(``data.required_fields``). EMPO's band (project's reading of its code, which zeroes a filtered prompt's rewards): a
prompt whose normalised semantic entropy is outside ``(delta_lo, delta_hi)`` gets total reward 0 on every
completion, hence advantage 0; it stays in the loss's normaliser, as every zero-advantage group does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_gcpo.algorithms.label_free import (
    EMPO,
    RENT,
    TTRL,
    LabelFreeReward,
    SelfCertainty,
    empo_rewards,
    rent_rewards,
    self_certainty_rewards,
    ttrl_rewards,
)
from lit_gcpo.rewards import RewardScores, RewardSet
from lit_gcpo.rewards.loading import needs_gold
from lit_gcpo.rewards.reward_model import reward_name


class Unscored:
    """The reward set of label-free training without extra rewards: every completion scores 0 (the label-free
    reward is added after the scoring pass). Reads nothing of the rows."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.scored_batches = self.usable_batches = 0  # as RewardSet counts them: nothing is scored here

    def score(self, prompts: Sequence[str], completions: Sequence[Any], rows: Sequence[Any]) -> RewardScores:
        return RewardScores(total=torch.zeros(len(completions), dtype=torch.float32))


def label_free_problem(
    label_free: LabelFreeReward | None,
    rewards: Sequence[Any],
    accuracy_reward: str | None,
    dynamic_sampling: bool = False,
) -> str | None:
    """Why these settings are refused for label-free training, naming the option at fault; None when they are fine
    (or ``label_free`` is None). ``rewards`` are the entries of ``data.rewards`` (names; reward models, which read no
    gold); ``dynamic_sampling``: whether ``data.dynamic_sampling`` is on."""
    if label_free is None:
        return None
    if not isinstance(label_free, LabelFreeReward):
        return f"data.label_free must be a LabelFreeReward (TTRL, EMPO, SelfCertainty, RENT), got {label_free!r}"
    if dynamic_sampling:
        return (
            f"data.dynamic_sampling keeps the groups whose rewards spread when they are collected, before the scoring "
            f"pass that label-free training (data.label_free: {label_free.name}) takes its reward from: not supported "
            "together; set data.dynamic_sampling null"
        )
    for name in rewards:
        if needs_gold(name):  # a reward model reads no gold: allowed
            return (
                f"data.rewards: {name!r} reads the gold answer, which label-free training (data.label_free: "
                f"{label_free.name}) never does; leave it out of data.rewards (extra training rewards must need no "
                f"gold) and name it in data.accuracy_reward to grade validation and test with it"
            )
    if accuracy_reward is not None and accuracy_reward in [reward_name(spec) for spec in rewards]:
        return (
            f"data.accuracy_reward {accuracy_reward!r} is one of data.rewards, the extra training rewards of "
            f"label-free training; evaluation grades with data.accuracy_reward on its own: leave it out of data.rewards"
        )
    return None


def reward_sets(
    names: Sequence[Any],
    weights: Sequence[float] | None,
    timeout: float,
    label_free: LabelFreeReward | None,
    accuracy_reward: str | None,
) -> tuple[Any, RewardSet]:
    """``(training reward set, evaluation reward set)``: one set for both without ``label_free``; with it, the extras
    ``names`` for training (``Unscored`` when there are none) and ``accuracy_reward`` plus the extras for evaluation.
    """
    if label_free is None:
        both = RewardSet.from_names(names, weights, timeout=timeout)
        return both, both
    train = RewardSet.from_names(names, weights, timeout=timeout) if names else Unscored()
    graded = ([accuracy_reward] if accuracy_reward is not None else []) + list(names)
    if not graded:
        return train, train  # nothing grades evaluation: its rewards are 0 too
    extra = list(weights) if weights is not None else [1.0] * len(names)
    evaluation_weights = ([1.0] if accuracy_reward is not None else []) + extra
    return train, RewardSet.from_names(graded, evaluation_weights, timeout=timeout)


def _answered(batch: Any) -> torch.Tensor:
    """``[N]`` bool: the completions with an extracted answer (None and "" are missing)."""
    answers = batch.answers or [None] * batch.num_completions
    return torch.tensor([a is not None and a != "" for a in answers], dtype=torch.bool, device=batch.group_ids.device)


def _required(batch: Any, field: str, method: str) -> Any:
    value = getattr(batch, field)
    if value is None:
        raise ValueError(
            f"label-free reward {method} needs batch.{field}; the RolloutDataModule asks the scoring pass and the "
            "answer clustering for it (data.label_free), a batch built elsewhere must carry it"
        )
    return value


def label_free_rewards(batch: Any, options: LabelFreeReward) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(rewards [N], keep [N] bool, metrics)`` of ``options``' method on a scored training batch."""
    group_ids, num_groups = batch.group_ids, batch.num_groups
    keep = torch.ones_like(group_ids, dtype=torch.bool)  # [N]
    if isinstance(options, TTRL):
        clusters = _required(batch, "answer_clusters", options.name).to(group_ids.device)
        rewards, metrics = ttrl_rewards(clusters, group_ids, num_groups, _answered(batch))
    elif isinstance(options, EMPO):
        clusters = _required(batch, "answer_clusters", options.name).to(group_ids.device)
        rewards, kept, metrics = empo_rewards(
            clusters, group_ids, num_groups, _answered(batch), options.delta_lo, options.delta_hi
        )
        keep = kept[group_ids]  # [N]
    elif isinstance(options, SelfCertainty):
        mean_logprob = _required(batch, "token_mean_logprob", options.name)
        rewards, metrics = self_certainty_rewards(mean_logprob, batch.completion_mask, int(batch.vocab_size))
    elif isinstance(options, RENT):
        entropy = _required(batch, "token_entropy", options.name)
        rewards, metrics = rent_rewards(entropy, batch.completion_mask, options.last_k)
    else:
        raise ValueError(f"unknown label-free reward {type(options).__name__}")
    return rewards.to(group_ids.device), keep, metrics


def apply_label_free(batch: Any, options: LabelFreeReward) -> None:
    """Write the label-free reward of a scored training batch into it: ``reward_components[<name>]``, ``rewards``
    (the label-free reward plus the extras' total, NaN extras counting 0; 0 for a prompt EMPO's band drops) and
    ``label_free/<metric>`` in ``metrics``."""
    rewards, keep, metrics = label_free_rewards(batch, options)  # [N], [N]
    extras = batch.rewards.to(rewards.device).nan_to_num(0.0)  # [N]
    batch.reward_components[options.name] = rewards
    batch.rewards = torch.where(keep, rewards + extras, torch.zeros_like(rewards))  # [N]
    batch.metrics.update({f"label_free/{name}": float(value) for name, value in metrics.items()})
