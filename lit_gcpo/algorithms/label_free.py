"""Label-free rewards computed from a group of completions (METHODS.md §7), as pure tensor functions.

Completions are flat (``N``), ``group_ids [N]`` names the prompt of each (``B = num_groups``), and per-group
reductions are segment operations as in ``lit_gcpo.algorithms.uncertainty``. Each function returns
``(rewards [N] float32, metrics)`` (``empo_rewards`` also a keep mask over prompts); metrics are detached 0-d tensors.

- ``ttrl`` (Zuo et al. 2025, TTRL, arXiv 2504.16084, its majority-voting reward): r_i = 1 when o_i's
  extracted answer equals the group's majority answer, else 0. The paper's pseudo-code (and its code,
  ``Counter(answers).most_common(1)``) leaves three choices that the project fixes: (1) the vote is over
  answers equal as section 3's clusters say (math-verify equivalence, or exact strings through
  ``answer_clusters``), and the reward compares clusters, as TTRL's reward re-grades each answer against the
  voted label; (2) a tie is won by the answer that appears first in the group (``most_common``'s order);
  (3) a completion without an answer neither votes nor is rewarded. TTRL's extractor returns "" for a math
  completion without a number, which can then win the vote and reward every empty answer; the project's
  rule (SEED-GRPO's: a missing answer is its own singleton) removes that artefact. A group with no answer
  gets r = 0 throughout. TTRL votes with 64 samples and trains on 32 of them: that subsampling is plumbing.
- ``empo`` (Zhang et al. 2025, EMPO, arXiv 2504.05812, semantic entropy minimisation): r_i = |C(o_i)| / G,
  the share of the group in o_i's semantic cluster, and a prompt is kept only when its semantic entropy
  (discrete, over the same clusters) lies in a band. The authors' TRL code keeps a prompt when SE < log G and
  gives 0 to a completion without an answer; their verl code clusters each missing answer alone (as section 3
  does) and rewards it 1/G.
  Project's reading: the band is on the normalised SE_n = SE / log G with strict bounds,
  ``delta_lo < SE_n < delta_hi``, default (0, 1): the TRL code's upper bound, plus the exclusion of SE_n = 0
  groups, whose rewards are all equal (no advantage) anyway. Missing answers are singletons and get r = 0.
- ``self_certainty`` (Zhao et al. 2025, Intuitor, arXiv 2505.19590, "self-certainty"): r_i = mean over o_i's
  tokens of KL(U || p_t) = -log V - (1/V) sum_v log p_t(v), from the per-token ``mean_logprob`` of
  ``lit_gcpo.algorithms.token_distribution``. Intuitor's code drops the constant -log V (it cancels in the group
  normalisation); the project keeps it, so the reward is the KL itself (>= 0).
- ``rent`` (Prabhudesai et al. 2025, RENT, arXiv 2505.22660): r_i = - mean over o_i's tokens of the
  token entropy H(p_t). The paper compares which tokens to use and finds the final (answer) tokens matter
  most; its released code averages over every completion token. Project's choice: every token by default
  (``last_k=None``, the released code), ``last_k = k`` for the mean over each completion's last k tokens.

The token-distribution rewards read ``[N, T]`` per-token summaries from the memory-bounded log-prob pass at the
loss temperature, never an ``[N, T, V]`` tensor (see ``lit_gcpo.algorithms.token_distribution``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lit_gcpo.algorithms.registry import Registry
from lit_gcpo.algorithms.uncertainty import global_cluster_index, group_sizes, semantic_entropy
from lit_gcpo.algorithms.weighting import signal_statistics

Metrics = dict[str, Tensor]


def answer_clusters(answers: Sequence[str | None], group_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Cluster ids by exact string equality within each group, and which completions have an answer.

    ``None`` and ``""`` are missing answers: each gets a cluster of its own. Returns ``(cluster_ids [N] long,
    answered [N] bool)``; ids are local to the group, in order of first appearance.
    """
    if len(answers) != len(group_ids):
        raise ValueError(f"{len(answers)} answers for {len(group_ids)} group ids")
    seen: dict[tuple[int, str], int] = {}
    next_id: dict[int, int] = {}
    cluster_ids, answered = [], []
    for answer, group in zip(answers, group_ids, strict=True):
        group = int(group)
        has_answer = answer is not None and answer != ""
        key = (group, answer) if has_answer else None
        if key is not None and key in seen:
            cluster_ids.append(seen[key])
        else:
            cluster_ids.append(next_id.get(group, 0))
            next_id[group] = cluster_ids[-1] + 1
            if key is not None:
                seen[key] = cluster_ids[-1]
        answered.append(has_answer)
    return torch.tensor(cluster_ids, dtype=torch.long), torch.tensor(answered, dtype=torch.bool)


def _answered_counts(
    cluster_ids: Tensor, group_ids: Tensor, num_groups: int, answered: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compact cluster index ``[N]``, group of each cluster ``[K]`` and answered members per cluster ``[K]``."""
    if answered.shape != cluster_ids.shape or answered.dtype != torch.bool:
        raise ValueError(f"answered must be a bool [N] = {tuple(cluster_ids.shape)}, got {answered.dtype}")
    cluster_index, cluster_group = global_cluster_index(cluster_ids, group_ids, num_groups)  # [N], [K]
    counts = torch.bincount(cluster_index, weights=answered.double(), minlength=cluster_group.numel())  # [K]
    return cluster_index, cluster_group, counts


def ttrl_rewards(cluster_ids: Tensor, group_ids: Tensor, num_groups: int, answered: Tensor) -> tuple[Tensor, Metrics]:
    """TTRL's majority-vote reward: 1 for the completions whose answer is in the group's majority cluster.

    Args:
        cluster_ids: ``[N]`` answer cluster of each completion (local or global ids, as in ``uncertainty``).
        group_ids: ``[N]`` prompt of each completion, values in ``[0, num_groups)``.
        num_groups: ``B``.
        answered: ``[N]`` bool, False where no answer was extracted (never votes, never rewarded).

    Returns ``(rewards [N] float32 in {0, 1}, metrics)``: ``majority_ratio_*`` (votes of the winner / G, per
    prompt) and ``answered_frac``.
    """
    cluster_index, cluster_group, counts = _answered_counts(cluster_ids, group_ids, num_groups, answered)
    n = cluster_ids.numel()
    positions = torch.arange(n, device=cluster_ids.device)  # [N]
    first = torch.full_like(counts, float(n)).scatter_reduce_(
        0, cluster_index, positions.double(), reduce="amin", include_self=True
    )  # [K] index of each cluster's first member
    # Most votes first, then earliest first appearance: a unique score per cluster, so one winner per group.
    score = torch.where(counts > 0, counts * (n + 1) - first, -1.0)  # [K]
    best = score.new_full((num_groups,), -1.0).scatter_reduce_(0, cluster_group, score, reduce="amax")  # [B]
    winner = (score == best[cluster_group]) & (counts > 0)  # [K]
    rewards = (winner[cluster_index] & answered).float()  # [N]
    majority = counts.new_zeros(num_groups).index_add_(0, cluster_group, torch.where(winner, counts, 0.0))  # [B]
    ratio = majority / group_sizes(group_ids, num_groups).clamp(min=1).double()  # [B]
    metrics = {**signal_statistics("majority_ratio", ratio), "answered_frac": answered.float().mean()}
    return rewards, metrics


def validate_entropy_band(delta_lo: float, delta_hi: float) -> None:
    """Refuse an EMPO band that keeps nothing: needs ``delta_lo < delta_hi``, ``delta_hi > 0``, ``delta_lo < 1``."""
    if not delta_lo < delta_hi:
        raise ValueError(f"empo needs delta_lo < delta_hi (a band of normalised SE), got {delta_lo} >= {delta_hi}")
    if not (delta_hi > 0.0 and delta_lo < 1.0):
        raise ValueError(
            f"empo's band (delta_lo, delta_hi) = ({delta_lo}, {delta_hi}) excludes every SE_n in [0, 1]; "
            "use delta_lo < 1 and delta_hi > 0"
        )


def empo_rewards(
    cluster_ids: Tensor,
    group_ids: Tensor,
    num_groups: int,
    answered: Tensor,
    delta_lo: float = 0.0,
    delta_hi: float = 1.0,
) -> tuple[Tensor, Tensor, Metrics]:
    """EMPO's semantic-cluster reward r_i = |C(o_i)| / G and its entropy band over prompts.

    Args:
        cluster_ids, group_ids, num_groups, answered: as in ``ttrl_rewards``; an unanswered completion must be
            a singleton cluster (``answer_clusters`` and section 3's clusterer make it so) and gets r = 0.
        delta_lo, delta_hi: keep a prompt when ``delta_lo < SE_n < delta_hi`` (discrete SE over its clusters,
            normalised by log G).

    Returns ``(rewards [N] float32, keep [B] bool, metrics)``: the rewards of every prompt (dropping the others
    is the caller's: their completions leave the loss), ``se_n_*`` and ``kept_frac``.
    """
    validate_entropy_band(delta_lo, delta_hi)
    cluster_index, cluster_group, _ = _answered_counts(cluster_ids, group_ids, num_groups, answered)
    members = torch.bincount(cluster_index, minlength=cluster_group.numel()).double()  # [K] all members
    share = members[cluster_index] / group_sizes(group_ids, num_groups).clamp(min=1).double()[group_ids]  # [N]
    rewards = torch.where(answered, share, 0.0).float()  # [N]
    se_n, _ = semantic_entropy(cluster_ids, group_ids, num_groups, kind="discrete", normalise=True)  # [B]
    keep = (se_n > delta_lo) & (se_n < delta_hi)  # [B]
    kept_frac = keep.float().mean() if num_groups else se_n.new_zeros(())
    metrics = {**signal_statistics("se_n", se_n), "kept_frac": kept_frac}
    return rewards, keep, metrics


def _masked_row_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over each row's mask tokens ``[N]`` (0 for a row without tokens) and the token counts ``[N]``."""
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(f"values and mask must share one [N, T] shape, got {tuple(values.shape)}, {tuple(mask.shape)}")
    on = mask > 0  # [N, T]
    counts = on.sum(-1)  # [N]
    sums = torch.where(on, values.detach().double(), 0.0).sum(-1)  # [N]
    return sums / counts.clamp(min=1), counts


def self_certainty_rewards(mean_logprob: Tensor, mask: Tensor, vocab_size: int) -> tuple[Tensor, Metrics]:
    """Intuitor's self-certainty r_i = mean_t KL(U || p_t) = mean_t (-log V - (1/V) sum_v log p_t(v)).

    Args:
        mean_logprob: ``[N, T]`` mean log-prob over the vocabulary at each token
            (``TokenDistributionStats.mean_logprob``, at the loss temperature).
        mask: ``[N, T]`` 1 on completion tokens.
        vocab_size: V, the size of the distribution's support (the lm head's rows).

    Returns ``(rewards [N] float32, metrics)``: ``self_certainty_*`` over completions and ``empty_completions``
    (completions without tokens, r = 0).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    kl_uniform = -math.log(vocab_size) - mean_logprob.detach().double()  # [N, T]
    rewards, counts = _masked_row_mean(kl_uniform, mask)  # [N]
    rewards = torch.where(counts > 0, rewards, 0.0).float()
    return rewards, {**signal_statistics("self_certainty", rewards), "empty_completions": (counts == 0).sum()}


def validate_last_k(last_k: int | None) -> None:
    """``last_k`` is None (every token) or a positive number of final tokens."""
    if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1):
        raise ValueError(f"rent's last_k must be None (every token) or an int >= 1, got {last_k!r}")


def rent_rewards(entropy: Tensor, mask: Tensor, last_k: int | None = None) -> tuple[Tensor, Metrics]:
    """RENT's reward r_i = - mean of the token entropy H(p_t) over o_i's tokens (or its last ``last_k``).

    Args:
        entropy: ``[N, T]`` token entropies at the loss temperature (``TokenDistributionStats.entropy``).
        mask: ``[N, T]`` 1 on completion tokens (any pattern: the last k are the last k mask tokens).
        last_k: None for every token, k >= 1 for each completion's final k tokens (all of them when shorter).

    Returns ``(rewards [N] float32, metrics)``: ``rent_entropy_*`` (the mean entropy, -r) and
    ``empty_completions`` (r = 0).
    """
    validate_last_k(last_k)
    on = mask > 0  # [N, T]
    if last_k is not None:
        from_end = on.flip(-1).long().cumsum(-1).flip(-1)  # [N, T] 1 at the last mask token, 2 before it, ...
        on = on & (from_end <= last_k)
    mean_entropy, counts = _masked_row_mean(entropy, on)  # [N]
    rewards = torch.where(counts > 0, -mean_entropy, 0.0).float()
    return rewards, {**signal_statistics("rent_entropy", -rewards), "empty_completions": (counts == 0).sum()}


def _group_means(values: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """``[B]`` mean of ``values [N]`` over each group (0 for an empty group), float64."""
    sums = values.new_zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, values.double())  # [B]
    return sums / group_sizes(group_ids, num_groups).clamp(min=1).double()


def label_free_signals(
    cluster_ids: Tensor,
    group_ids: Tensor,
    num_groups: int,
    answered: Tensor,
    *,
    token_entropy: Tensor | None = None,
    token_mean_logprob: Tensor | None = None,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """The label-free methods' signals of a prompt's (un)certainty, ``[B]`` float64 each: the group mean of each
    method's reward, for the faithfulness diagnostic (METHODS.md §6) beside SE, CD, BoT and U_c.

    - ``majority``: TTRL's majority agreement, the share of the group in its majority answer cluster (the mean TTRL
      reward: the winners are answered);
    - ``cluster_share``: EMPO's mean reward, the mean over completions of the share of their cluster (answered
      ones; ``sum_k p_k^2`` when every completion answers), before its entropy band;
    - ``self_certainty``: the mean over the group of Intuitor's self-certainty (needs ``token_mean_logprob``,
      ``mask`` and ``vocab_size``);
    - ``token_entropy``: the mean over the group of each completion's mean token entropy, minus RENT's reward
      (needs ``token_entropy`` and ``mask``).

    The first two are high for certain prompts, ``token_entropy`` is high for uncertain ones.
    """
    signals = {
        "majority": _group_means(ttrl_rewards(cluster_ids, group_ids, num_groups, answered)[0], group_ids, num_groups),
        "cluster_share": _group_means(
            empo_rewards(cluster_ids, group_ids, num_groups, answered)[0], group_ids, num_groups
        ),
    }
    if token_mean_logprob is not None and mask is not None and vocab_size is not None:
        certainty, _ = self_certainty_rewards(token_mean_logprob, mask, vocab_size)  # [N]
        signals["self_certainty"] = _group_means(certainty, group_ids, num_groups)
    if token_entropy is not None and mask is not None:
        signals["token_entropy"] = -_group_means(rent_rewards(token_entropy, mask)[0], group_ids, num_groups)
    return signals


@dataclass(frozen=True)
class LabelFreeReward:
    """A label-free reward (``data.label_free``): one of the subclasses below, each named in ``LABEL_FREE_REWARDS``
    and validated on construction (so at parse time from a config). ``needs`` is what it reads from the batch."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class TTRL(LabelFreeReward):
    """``ttrl``: TTRL's majority vote over section 3's answer clusters (no options)."""

    name: ClassVar[str] = "ttrl"
    needs: ClassVar[frozenset[str]] = frozenset({"answer_clusters"})


@dataclass(frozen=True)
class EMPO(LabelFreeReward):
    """``empo``: the share of the group in a completion's answer cluster, on prompts whose normalised semantic
    entropy lies in a band (the others get r = 0, hence no advantage, as EMPO's code filters them).

    Args:
        delta_lo: keep a prompt only when SE_n > delta_lo.
        delta_hi: keep a prompt only when SE_n < delta_hi.
    """

    name: ClassVar[str] = "empo"
    needs: ClassVar[frozenset[str]] = frozenset({"answer_clusters"})
    delta_lo: float = 0.0
    delta_hi: float = 1.0

    def __post_init__(self) -> None:
        validate_entropy_band(self.delta_lo, self.delta_hi)


@dataclass(frozen=True)
class SelfCertainty(LabelFreeReward):
    """``self_certainty``: Intuitor's mean KL(U || p_t) over every completion token, at the loss temperature (no
    options)."""

    name: ClassVar[str] = "self_certainty"
    needs: ClassVar[frozenset[str]] = frozenset({"token_mean_logprob"})


@dataclass(frozen=True)
class RENT(LabelFreeReward):
    """``rent``: minus the mean token entropy at the loss temperature, over every completion token or the last k.

    Args:
        last_k: None averages the entropy over every completion token; k >= 1 over the final k tokens.
    """

    name: ClassVar[str] = "rent"
    needs: ClassVar[frozenset[str]] = frozenset({"token_entropy"})
    last_k: int | None = None

    def __post_init__(self) -> None:
        validate_last_k(self.last_k)


LABEL_FREE_REWARDS: Registry[type[LabelFreeReward]] = Registry("label-free reward")
"""Method name -> its options dataclass (validated on construction, i.e. at parse time)."""
for _reward in (TTRL, EMPO, SelfCertainty, RENT):
    LABEL_FREE_REWARDS.add(_reward.name, _reward)
