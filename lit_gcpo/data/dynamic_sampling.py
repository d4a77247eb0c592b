"""Dynamic sampling (DAPO, Yu et al. 2025, section 3.2): train only on groups whose rewards differ, drawing more
prompts until the batch is full.

A group whose completions all have the same reward has advantage 0 for every completion (``lit_gcpo.algorithms.
advantages``: exactly 0 under GRPO and Dr. GRPO), so it adds no gradient but still counts in the loss's normaliser
and dilutes the step. With ``data.dynamic_sampling`` set, a training step draws rounds of prompts, each a whole
batch of the training stream (``batch_size`` prompts per rank, the next batch of ``PromptStream`` in order, each
prompt sampled from the seed of its stream position as always), drops the groups without spread, and stops when
the groups kept over all ranks reach ``batch_size x world_size`` or after ``max_rounds`` rounds. The batch trained
on is the first ``batch_size x world_size`` kept groups in stream order (the others with spread of the last round
are discarded, as verl's ``filter_groups`` truncates to the train batch); after ``max_rounds`` it is what was kept,
rounded down to a multiple of the ranks, and ``rollout/groups_missing`` says how many are missing.

Where the paper and its implementations leave a choice, the project chooses:

- **Spread** (``groups_with_spread``): the population std of a group's finite total rewards (the rewards the
  advantages are computed from; a failed reward, NaN, is left out as the advantages leave it out) must exceed
  ``min_reward_std`` (1e-6 by default), and a group needs two finite rewards. Binary rewards all equal have std 0;
  the epsilon also drops groups whose rewards differ only by float noise of a sum of weighted rewards (verl and
  NeMo-RL compare with exactly 0, which keeps such a group, at GRPO advantages of about noise / 1e-4). With
  ``reward`` naming one reward function, that reward must have spread too: DAPO filters on accuracy (verl's
  ``metric: acc``), which keeps an all-wrong group whose shaping rewards differ out of the batch.
- **Rounds**: a round is one batch of the stream, not a larger generation batch (verl's ``gen_batch_size``), so
  the checkpoint's data position stays a count of batches and a resumed run continues at the same prompt.
- **Data parallel**: the fill is global. Each rank samples its share of a round; the ranks exchange how many groups
  each kept (one ``all_gather`` per round), so all stop at the same round; then the kept groups are exchanged and
  each rank trains on an equal, contiguous slice of the global list in stream order. Every rank therefore holds
  the same number of groups (``fsdp2``'s forward passes are collectives and need the same micro-batches on every
  rank), and the batch is the one a single process would train on with the global batch size.
- **Normalisation**: the loss divides by the global counts of the trained batch (tokens or sequences summed over
  ranks, as without dynamic sampling: ``GRPOModule.training_step``), not by the nominal ``batch_size``: a short
  batch after ``max_rounds`` is a noisier estimate of a gradient of the usual scale, not a smaller step. The
  uncertainty callback's means (the ``batch_mean`` scale and the normalisation of the weights to mean 1) are over
  the groups with reward spread of every rank, which are now all the trained groups.
- **Nothing to train on**: fewer kept groups than ranks after ``max_rounds`` is an error naming the setting (verl
  raises whenever ``max_num_gen_batches`` leaves the batch short; here a short batch trains): a policy that no
  longer gets any prompt partly right cannot be trained by GRPO on this data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_gcpo.algorithms.uncertainty import finite_group_std
from lit_gcpo.data.batch import COUNT_SUFFIXES, PromptBatch, RolloutBatch
from lit_gcpo.data.group_selection import batch_to, concat_groups, select_groups


@dataclass
class DynamicSampling:
    """Dynamic sampling (``lit_gcpo.data.dynamic_sampling``): drop groups without reward spread, sample more.

    Attributes:
        max_rounds: at most this many batches of prompts per training step (the first included); then train on
            the groups kept so far.
        min_reward_std: a group is kept when the population std of its finite total rewards exceeds this.
        reward: None (the total reward alone), or the name of one reward function (e.g. the accuracy reward, as
            DAPO) whose std must exceed ``min_reward_std`` too.
    """

    max_rounds: PositiveInt = 8
    min_reward_std: NonNegativeFloat = 1e-6
    reward: str | None = None

    def __post_init__(self) -> None:  # Python callers: the CLI refuses these when it parses them
        if self.max_rounds < 1:
            raise ValueError(f"dynamic_sampling.max_rounds must be >= 1, got {self.max_rounds}")
        if not self.min_reward_std >= 0:
            raise ValueError(f"dynamic_sampling.min_reward_std must be >= 0, got {self.min_reward_std}")

    @classmethod
    def checked(cls, value: DynamicSampling | dict[str, Any] | None, rewards: list[str]) -> DynamicSampling | None:
        """``value`` (settings, a dict of them from Python, or None: off), its ``reward`` one of ``rewards``."""
        settings = cls(**value) if isinstance(value, dict) else value
        if settings is not None and settings.reward not in (None, *rewards):
            raise ValueError(f"dynamic_sampling.reward {settings.reward!r} is not one of rewards {rewards}")
        return settings

    def plain(self) -> dict[str, Any]:
        """The settings as plain Python values (a checkpoint read with ``weights_only`` refuses jsonargparse's
        ``PositiveInt``), for the comparison on resume."""
        return {"max_rounds": int(self.max_rounds), "min_reward_std": float(self.min_reward_std), "reward": self.reward}


def groups_with_spread(
    rewards: torch.Tensor, group_ids: torch.Tensor, num_groups: int, min_std: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``[B]`` bool: the groups whose finite rewards have a population std above ``min_std`` (and at least two).

    ``std_b = sqrt(mean_i (r_i - mean_b)^2)`` over the group's finite rewards, in float64 (two passes). Metrics:
    ``std`` ``[B]`` (0 for a group with fewer than two finite rewards).
    """
    std, counts = finite_group_std(rewards, group_ids, num_groups)  # [B], [B]
    std = torch.where(counts >= 2, std, 0.0)  # [B]
    return (counts >= 2) & (std > min_std), {"std": std}


@dataclass(frozen=True)
class FillPlan:
    """Which kept groups make the batch: ``taken[k][r]`` of rank ``r``'s kept groups of round ``k`` (its first
    ones), ``trained`` in all (a multiple of the ranks), ``trained / world_size`` on each rank."""

    taken: list[list[int]]
    trained: int
    available: int


def fill_plan(kept: list[list[int]], target: int) -> FillPlan:
    """The first ``target`` kept groups in stream order (round, then rank, then position in the rank's batch),
    given ``kept[k][r]``, the count of groups rank ``r`` kept in round ``k``; fewer than ``target`` available: the
    largest multiple of the ranks that is."""
    world_size = len(kept[0])
    available = sum(map(sum, kept))
    trained = target if available >= target else available - available % world_size
    taken, left = [], trained
    for counts in kept:
        row = []
        for count in counts:
            row.append(min(count, left))
            left -= row[-1]
        taken.append(row)
    return FillPlan(taken=taken, trained=trained, available=available)


class RankExchange(Protocol):
    """The data-parallel ranks as dynamic sampling sees them: ``all_gather`` returns every rank's ``value``
    (any picklable object) in rank order, on every rank."""

    rank: int
    world_size: int

    def all_gather(self, value: Any) -> list[Any]: ...


@dataclass
class TorchExchange:
    """``RankExchange`` over ``torch.distributed``: ``group``, a process group of every rank (None: the default
    one; one-step-off-policy rollouts exchange from their worker thread over a gloo group of their own); one process:
    no communication."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def all_gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value, group=self.group)
        return gathered


def merge_round_metrics(rounds: list[dict[str, float]]) -> dict[str, float]:
    """One step's rollout metrics from its rounds' (equal numbers of completions each): timings and reward-failure
    counts summed, ``*_max`` the maximum, ``rollout/tokens_per_s`` the tokens of all rounds over their generation
    time, any other value (means and fractions) the mean over the rounds."""
    merged: dict[str, float] = {}
    for key in rounds[0]:
        values = [float(metrics[key]) for metrics in rounds]
        if key.startswith("time/") or key.endswith(COUNT_SUFFIXES):
            merged[key] = sum(values)
        elif key.endswith("_max"):
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    if "rollout/tokens_per_s" in merged and "time/generate_s" in merged:
        tokens = sum(m["rollout/tokens_per_s"] * m["time/generate_s"] for m in rounds)
        merged["rollout/tokens_per_s"] = tokens / max(merged["time/generate_s"], 1e-9)
    return merged


def _my_slice(parts: list[RolloutBatch], start: int, stop: int) -> list[RolloutBatch]:
    """Groups ``[start, stop)`` of the parts taken one after the other."""
    sliced, offset = [], 0
    for part in parts:
        low, high = max(start - offset, 0), min(stop - offset, part.num_groups)
        if low < high:
            sliced.append(select_groups(part, list(range(low, high))))
        offset += part.num_groups
    return sliced


@dataclass
class _Round:
    """One round on this rank: how many groups it sampled, those with spread (the others are let go at once), every
    completion's total reward and the round's metrics (what the step logs), and how many groups each rank kept."""

    sampled: int
    kept: RolloutBatch
    rewards: torch.Tensor
    metrics: dict[str, float]
    kept_per_rank: list[int]


def fill_rollout(
    draw: Callable[[], RolloutBatch],
    settings: DynamicSampling,
    batch_size: int,
    exchange: RankExchange,
    pad_token_id: int,
) -> RolloutBatch:
    """One training step's batch: rounds from ``draw`` (this rank's next batch of the stream, collected and scored)
    until ``batch_size x world_size`` groups with spread are kept over all ranks or ``max_rounds`` are spent; this
    rank's equal share of the kept groups in stream order (module docstring). ``metrics`` carries the rounds'
    merged metrics and ``rollout/rounds``, ``prompts_sampled``, ``groups_dropped``, ``groups_surplus``,
    ``groups_trained``, ``groups_missing`` (global counts), ``sampled_reward_mean`` (this rank's rounds)."""
    target = batch_size * exchange.world_size
    rounds: list[_Round] = []
    while not rounds or (sum(sum(r.kept_per_rank) for r in rounds) < target and len(rounds) < settings.max_rounds):
        rollout = draw()
        keep = _spread_groups(rollout, settings)
        counts = [int(count) for count in exchange.all_gather(len(keep))]
        rounds.append(
            _Round(rollout.num_groups, select_groups(rollout, keep), rollout.rewards, rollout.metrics, counts)
        )
    plan = fill_plan([r.kept_per_rank for r in rounds], target)
    sampled = sum(r.sampled for r in rounds) * exchange.world_size  # every rank samples batch_size a round
    if plan.trained == 0:
        raise RuntimeError(
            f"dynamic sampling: {len(rounds)} rounds (data.dynamic_sampling.max_rounds) of {sampled} prompts gave "
            f"{plan.available} groups with reward spread over {exchange.world_size} rank(s): nothing to train on. The "
            "policy gets every prompt all right or all wrong; raise max_rounds or train on other prompts"
        )
    batch = concat_groups(_this_ranks_share(rounds, plan, exchange), pad_token_id)
    batch.metrics = merge_round_metrics([r.metrics for r in rounds]) | _fill_metrics(rounds, plan, sampled, target)
    if plan.trained < target:
        rank_zero_warn(  # once: rollout/groups_missing counts every step's shortfall
            "dynamic sampling: data.dynamic_sampling.max_rounds rounds did not fill the batch with groups with reward "
            "spread; the step trains on fewer groups (logged per step as rollout/groups_missing)"
        )
    return batch


def stream_rollout(
    position: int,
    collect: Callable[[PromptBatch], RolloutBatch],
    prompts: Callable[[int], PromptBatch],
    settings: DynamicSampling | None,
    batch_size: int,
    exchange: RankExchange,
    pad_token_id: int,
) -> tuple[RolloutBatch, int]:
    """A training step's batch drawn from the stream from this rank's batch ``position`` on (``prompts(i)``: its
    batch ``i``; ``collect``: a prompt batch's groups, rewarded), and how many batches it drew: that one batch
    without ``settings``, else the rounds of ``fill_rollout``, one batch each."""
    if settings is None:
        return collect(prompts(position)), 1
    drawn = 0

    def draw() -> RolloutBatch:
        nonlocal drawn
        drawn += 1
        return collect(prompts(position + drawn - 1))

    return fill_rollout(draw, settings, batch_size, exchange, pad_token_id), drawn


def _this_ranks_share(rounds: list[_Round], plan: FillPlan, exchange: RankExchange) -> list[RolloutBatch]:
    """The parts of this rank's batch: its groups of the plan on one process; on several, every rank's groups of
    the plan gathered in stream order (round, then rank) and this rank's contiguous equal slice of them."""
    mine = [select_groups(r.kept, list(range(plan.taken[k][exchange.rank]))) for k, r in enumerate(rounds)]
    if exchange.world_size == 1:
        return mine
    device = rounds[0].rewards.device
    gathered = exchange.all_gather([batch_to(part, "cpu") for part in mine])  # [W][K] parts
    ordered = [gathered[rank][k] for k in range(len(rounds)) for rank in range(exchange.world_size)]
    share = plan.trained // exchange.world_size
    start = exchange.rank * share
    return [batch_to(part, device) for part in _my_slice(ordered, start, start + share)]


def _spread_groups(rollout: RolloutBatch, settings: DynamicSampling) -> list[int]:
    """The groups of ``rollout`` with reward spread (the total reward's, and ``settings.reward``'s when named)."""
    keep, _ = groups_with_spread(rollout.rewards, rollout.group_ids, rollout.num_groups, settings.min_reward_std)
    if settings.reward is not None:
        scores = rollout.reward_components[settings.reward]  # [N]
        keep &= groups_with_spread(scores, rollout.group_ids, rollout.num_groups, settings.min_reward_std)[0]
    return keep.nonzero().flatten().tolist()


def _fill_metrics(rounds: list[_Round], plan: FillPlan, sampled: int, target: int) -> dict[str, float]:
    rewards = torch.cat([r.rewards for r in rounds])  # [K N]
    finite = rewards[torch.isfinite(rewards)]
    return {
        "rollout/rounds": float(len(rounds)),
        "rollout/prompts_sampled": float(sampled),
        "rollout/groups_dropped": float(sampled - plan.available),
        "rollout/groups_surplus": float(plan.available - plan.trained),
        "rollout/groups_trained": float(plan.trained),
        "rollout/groups_missing": float(target - plan.trained),
        "rollout/sampled_reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
    }
