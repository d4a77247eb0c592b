"""Per-prompt uncertainty signals of a group of completions (METHODS.md §4), as pure tensor functions.

Every function works on a whole step at once: completions are flat (``N`` of them), ``group_ids [N]``
says which of the ``B = num_groups`` prompts each belongs to, and the per-group reductions are
``index_add_`` / ``scatter_reduce_`` segment operations, never a Python loop over groups. Each returns
``(value [B], metrics)`` where ``metrics`` holds detached 0-dim tensors ready to log.

Cluster ids: ``cluster_ids [N]`` may be local to the group (0, 1, ... restarting in every group, as a
per-group clusterer produces them) or global; only the pair ``(group_ids[n], cluster_ids[n])`` names a
cluster, so two groups never share a cluster even when they reuse a local id.

Sources and the project's readings:
- Semantic entropy in SEED-GRPO's form (arXiv 2505.12346, "Rao" estimator; Kuhn et al. 2023): the
  weight of a completion is the softmax over its group of the *length-normalised* sequence
  log-likelihood ``sum_t m old / sum_t m`` (``RolloutBatch.seq_logprobs``). The ``discrete`` variant
  counts completions instead. Normalised by ``log G`` with G the group's own size (a group of one has
  SE_n = 0). NaN log-likelihoods get zero mass; a group with no finite one falls back to ``discrete``.
- Cosine Dispersion, Barycentric Transport and Reward Dispersion are named by GCPO (arXiv 2605.21801)
  whose formulas are not public; the definitions here are the project's reading written in METHODS.md.
  BoT uses the same cluster masses p_k as SE and the *unweighted* mean unit embedding of each cluster.
- Centring (METHODS.md §5.1.1, project's reading): learned representations are anisotropic (one shared
  direction dominates), which squeezes every cosine towards 1 and every geometric signal towards 0, so CD
  and BoT are computed on embeddings minus the mean embedding of the whole step (all completions of all
  prompts, all ranks through ``reduce``). Embedding *clustering* (``lit_gcpo.algorithms.clustering``) keeps the raw
  embeddings: its threshold tau is a cosine of the encoder's own space.
- Advantage weights (METHODS.md §5, §5.1) live in ``lit_gcpo.algorithms.weighting`` and are re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_gcpo.algorithms.weighting import (
    ADVANTAGE_WEIGHTINGS,
    GEOMETRIC_SIGNALS,
    SCALES,
    WEIGHT_FAMILIES,
    WEIGHTING_DEFAULTS,
    Reduce,
    advantage_weights,
    calibrated_uncertainty,
    no_reduce,
    normalise_to_mean_one,
    signal_statistics,
)

Metrics = dict[str, Tensor]

SE_KINDS = ("rao", "discrete")
CENTERINGS = ("batch", "none")

__all__ = [
    "ADVANTAGE_WEIGHTINGS",
    "CENTERINGS",
    "GEOMETRIC_SIGNALS",
    "SCALES",
    "SE_KINDS",
    "WEIGHTING_DEFAULTS",
    "WEIGHT_FAMILIES",
    "advantage_weights",
    "barycentric_transport",
    "calibrated_uncertainty",
    "center_embeddings",
    "cosine_dispersion",
    "normalise_to_mean_one",
    "reward_dispersion",
    "semantic_entropy",
    "uncertainty_signals",
]


def _summary(name: str, value: Tensor) -> Metrics:
    """mean/min/max/std of a ``[B]`` signal as detached 0-dim tensors (empty batch -> zeros)."""
    return signal_statistics(name, value)


def group_sizes(group_ids: Tensor, num_groups: int) -> Tensor:
    """``[B]`` number of completions in each group (long)."""
    return torch.bincount(group_ids, minlength=num_groups)[:num_groups]


def global_cluster_index(cluster_ids: Tensor, group_ids: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Compact global cluster index ``[N]`` in ``[0, K)`` and the group of every cluster ``[K]``.

    Local and global cluster ids are both accepted: a cluster is the pair ``(group, cluster_id)``.
    """
    if cluster_ids.shape != group_ids.shape:
        raise ValueError(f"cluster_ids {tuple(cluster_ids.shape)} and group_ids {tuple(group_ids.shape)} differ")
    if cluster_ids.numel() and int(cluster_ids.min()) < 0:
        raise ValueError("cluster_ids must be non-negative")
    span = int(cluster_ids.max()) + 1 if cluster_ids.numel() else 1
    pair_key = group_ids.long() * span + cluster_ids.long()  # [N]
    unique_keys, cluster_index = torch.unique(pair_key, return_inverse=True)  # [K], [N]
    return cluster_index, torch.div(unique_keys, span, rounding_mode="floor")  # [N], [K]


def clusters_per_group(cluster_ids: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """``[B]`` number of distinct clusters in each group."""
    _, cluster_group = global_cluster_index(cluster_ids, group_ids, num_groups)
    return torch.bincount(cluster_group, minlength=num_groups)[:num_groups]


def completion_probs(
    group_ids: Tensor, num_groups: int, seq_logprobs: Tensor | None = None, kind: str = "rao"
) -> Tensor:
    """``[N]`` probability pi_i of each completion within its group (sums to 1 over every group).

    ``rao``: softmax over the group of ``seq_logprobs`` (length-normalised log-likelihoods);
    ``discrete``: 1 / G.
    """
    if kind not in SE_KINDS:
        raise ValueError(f"unknown semantic-entropy kind {kind!r}; valid: {', '.join(SE_KINDS)}")
    sizes = group_sizes(group_ids, num_groups)  # [B]
    uniform = 1.0 / sizes.clamp(min=1).double()[group_ids]  # [N]
    if kind == "discrete":
        return uniform
    if seq_logprobs is None:
        raise ValueError("seq_logprobs is required for kind='rao' (use kind='discrete' without it)")
    if seq_logprobs.shape != group_ids.shape:
        raise ValueError(f"seq_logprobs {tuple(seq_logprobs.shape)} must match group_ids {tuple(group_ids.shape)}")
    scores = seq_logprobs.detach().double()  # [N]
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    group_max = scores.new_full((num_groups,), -math.inf).scatter_reduce_(
        0, group_ids, scores, reduce="amax", include_self=True
    )  # [B]
    usable = torch.isfinite(group_max)  # [B] False: no finite log-likelihood (-> uniform)
    exp_scores = torch.exp(scores - torch.where(usable, group_max, 0.0)[group_ids])  # [N]
    exp_scores = torch.where(usable[group_ids], exp_scores, 0.0)
    normaliser = scores.new_zeros(num_groups).index_add_(0, group_ids, exp_scores)  # [B]
    rao = exp_scores / normaliser.clamp(min=1e-300)[group_ids]  # [N]
    return torch.where(usable[group_ids], rao, uniform)


def cluster_probs(
    cluster_ids: Tensor, group_ids: Tensor, num_groups: int, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster masses ``p_k = sum_{i in C_k} pi_i`` ``[K]``, the group of each cluster ``[K]`` and the
    compact cluster index of each completion ``[N]``."""
    cluster_index, cluster_group = global_cluster_index(cluster_ids, group_ids, num_groups)
    masses = probs.new_zeros(cluster_group.numel()).index_add_(0, cluster_index, probs)  # [K]
    return masses, cluster_group, cluster_index


def semantic_entropy(
    cluster_ids: Tensor,
    group_ids: Tensor,
    num_groups: int,
    seq_logprobs: Tensor | None = None,
    kind: str = "rao",
    normalise: bool = True,
) -> tuple[Tensor, Metrics]:
    """Semantic entropy ``SE = -sum_k p_k log p_k`` of every group, ``[B]`` float32.

    Args:
        cluster_ids: ``[N]`` cluster of each completion (local or global ids, see module docstring).
        group_ids: ``[N]`` group (prompt) of each completion, values in ``[0, num_groups)``.
        num_groups: ``B``.
        seq_logprobs: ``[N]`` length-normalised sequence log-likelihoods; required for ``rao``.
        kind: ``rao`` (probability-weighted clusters, SEED-GRPO) or ``discrete`` (counts).
        normalise: divide by ``log G`` (SE_n in [0, 1]; 0 for a group of one).

    Returns ``(se or se_n [B], metrics)``; metrics hold the summary of both SE and SE_n.
    """
    probs = completion_probs(group_ids, num_groups, seq_logprobs, kind)  # [N]
    masses, cluster_group, _ = cluster_probs(cluster_ids, group_ids, num_groups, probs)  # [K], [K]
    entropy = probs.new_zeros(num_groups).index_add_(0, cluster_group, -torch.special.xlogy(masses, masses))
    entropy = entropy.clamp(min=0.0)  # [B] rounding can leave -1e-17 for one cluster
    entropy_n = normalised_entropy(entropy, group_ids, num_groups)  # [B]
    metrics = {**_summary("se", entropy), **_summary("se_n", entropy_n)}
    return (entropy_n if normalise else entropy).float(), metrics


def normalised_entropy(entropy: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """``SE / log G`` per group, clamped to [0, 1]; 0 for groups of fewer than two completions."""
    log_sizes = group_sizes(group_ids, num_groups).to(entropy.dtype).log()  # [B]
    return torch.where(log_sizes > 0, entropy / log_sizes.clamp(min=1e-12), 0.0).clamp(0.0, 1.0)


def _unit(embeddings: Tensor) -> Tensor:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {tuple(embeddings.shape)}")
    return F.normalize(embeddings.detach().double(), dim=-1)  # [N, d]


def center_embeddings(embeddings: Tensor, reduce: Reduce = no_reduce) -> Tensor:
    """``embeddings [N, d]`` minus the mean embedding of the whole step (all ranks through ``reduce``).

    When every row equals that mean (a step of one completion, or of identical ones) nothing is left to give a
    direction, and the embeddings are returned uncentred rather than as zero vectors.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {tuple(embeddings.shape)}")
    values = embeddings.detach().double()  # [N, d]
    local = torch.cat([values.sum(0), values.new_tensor([float(values.shape[0])])])  # [d + 1]
    total = reduce(local)
    mean = total[:-1] / total[-1].clamp(min=1.0)  # [d]
    centred = values - mean  # [N, d]
    scale = values.norm(dim=-1).max() if values.numel() else values.new_zeros(())
    if values.numel() and bool(centred.norm(dim=-1).max() <= 1e-9 * scale.clamp(min=1e-30)):
        return values
    return centred


def cosine_dispersion(embeddings: Tensor, group_ids: Tensor, num_groups: int) -> tuple[Tensor, Metrics]:
    """Mean pairwise cosine distance of each group's unit embeddings, ``[B]`` in [0, 1].

    ``CD = 1 - sum_{i != j} <e_i, e_j> / (G (G - 1))`` with ``sum_{i != j} <e_i, e_j> = |sum_i e_i|^2 -
    sum_i |e_i|^2`` (O(G d) instead of O(G^2 d)). Groups of fewer than two completions get 0.
    """
    unit = _unit(embeddings)  # [N, d]
    sums = unit.new_zeros(num_groups, unit.shape[1]).index_add_(0, group_ids, unit)  # [B, d]
    sq_norms = unit.new_zeros(num_groups).index_add_(0, group_ids, (unit * unit).sum(-1))  # [B] = G
    sizes = group_sizes(group_ids, num_groups).double()  # [B]
    pairs = sizes * (sizes - 1)  # [B]
    off_diagonal = (sums * sums).sum(-1) - sq_norms  # [B]
    dispersion = torch.where(pairs > 0, 1.0 - off_diagonal / pairs.clamp(min=1.0), 0.0).clamp(0.0, 1.0)
    return dispersion.float(), _summary("cd", dispersion)


def barycentric_transport(
    embeddings: Tensor,
    cluster_ids: Tensor,
    group_ids: Tensor,
    num_groups: int,
    seq_logprobs: Tensor | None = None,
    kind: str = "rao",
    probs: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Cost of moving every cluster's mass to the group barycentre, ``[B]`` in [0, 1].

    ``BoT = sum_k p_k |mu_k - mu_bar|^2 = sum_k p_k |mu_k|^2 - |mu_bar|^2`` with ``mu_k`` the mean unit
    embedding of cluster k and ``mu_bar = sum_k p_k mu_k``. ``p_k`` are the same cluster masses as in
    ``semantic_entropy`` (``seq_logprobs``/``kind``), or sums of the given per-completion ``probs [N]``.
    """
    unit = _unit(embeddings)  # [N, d]
    if probs is None:
        probs = completion_probs(group_ids, num_groups, seq_logprobs, kind)  # [N]
    masses, cluster_group, cluster_index = cluster_probs(cluster_ids, group_ids, num_groups, probs.double())
    num_clusters = masses.numel()
    counts = torch.bincount(cluster_index, minlength=num_clusters).double()  # [K]
    centroids = unit.new_zeros(num_clusters, unit.shape[1]).index_add_(0, cluster_index, unit)  # [K, d]
    centroids = centroids / counts.clamp(min=1.0)[:, None]
    spread = unit.new_zeros(num_groups).index_add_(0, cluster_group, masses * (centroids * centroids).sum(-1))
    barycentre = unit.new_zeros(num_groups, unit.shape[1]).index_add_(
        0, cluster_group, masses[:, None] * centroids
    )  # [B, d]
    transport = (spread - (barycentre * barycentre).sum(-1)).clamp(0.0, 1.0)  # [B]
    return transport.float(), _summary("bot", transport)


def reward_dispersion(
    rewards: Tensor, group_ids: Tensor, num_groups: int, reward_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[Tensor, Metrics]:
    """Population std of each group's rewards over its maximum ``(r_max - r_min) / 2``, ``[B]`` in [0, 1].

    Non-finite rewards (failed reward functions) are left out of their group and counted in
    ``metrics["nonfinite_rewards"]``; a group with no finite reward gets 0.
    """
    low, high = reward_range
    if not high > low:
        raise ValueError(f"reward_range must be (min, max) with max > min, got {reward_range}")
    std, _ = finite_group_std(rewards, group_ids, num_groups)  # [B]
    dispersion = (std / ((high - low) / 2.0)).clamp(0.0, 1.0)  # [B]
    metrics = {**_summary("rd", dispersion), "nonfinite_rewards": (~torch.isfinite(rewards)).sum().detach()}
    return dispersion.float(), metrics


def finite_group_std(rewards: Tensor, group_ids: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(std [B], counts [B])``: the population std of each group's finite rewards (0 for a group without any) and
    how many they are, in float64 with a two-pass variance (reward dispersion; dynamic sampling's spread test)."""
    values = rewards.detach().double()  # [N]
    finite = torch.isfinite(values)  # [N]
    values = torch.where(finite, values, 0.0)
    weight = finite.double()
    counts = values.new_zeros(num_groups).index_add_(0, group_ids, weight)  # [B]
    means = values.new_zeros(num_groups).index_add_(0, group_ids, values * weight) / counts.clamp(min=1.0)
    centred = (values - means[group_ids]) * weight  # [N] two-pass variance for precision
    variance = values.new_zeros(num_groups).index_add_(0, group_ids, centred * centred) / counts.clamp(min=1.0)
    return variance.sqrt(), counts


def uncertainty_signals(
    group_ids: Tensor,
    num_groups: int,
    *,
    rewards: Tensor,
    cluster_ids: Tensor | None = None,
    embeddings: Tensor | None = None,
    seq_logprobs: Tensor | None = None,
    se_kind: str = "rao",
    reward_range: tuple[float, float] = (0.0, 1.0),
    geometric: str = "bot",
    center: str = "batch",
    reduce: Reduce = no_reduce,
) -> tuple[dict[str, Tensor], Metrics]:
    """Every signal that the inputs allow, ``[B]`` each, and their merged metrics.

    Always ``rd``; with ``cluster_ids``: ``se``, ``se_n``; with ``embeddings``: ``cd``; with both:
    ``bot``; and ``u_c`` = ``signals[geometric] * (1 - rd)`` when that geometric signal exists.
    ``center``: ``batch`` computes CD and BoT on embeddings centred over the step (all ranks through
    ``reduce``, see the module docstring), ``none`` on the raw embeddings.
    """
    if center not in CENTERINGS:
        raise ValueError(f"unknown center {center!r}; valid: {', '.join(CENTERINGS)}")
    signals: dict[str, Tensor] = {}
    metrics: Metrics = {}
    signals["rd"], rd_metrics = reward_dispersion(rewards, group_ids, num_groups, reward_range)
    metrics.update(rd_metrics)
    if cluster_ids is not None:
        signals["se"], se_metrics = semantic_entropy(
            cluster_ids, group_ids, num_groups, seq_logprobs, kind=se_kind, normalise=False
        )
        signals["se_n"] = normalised_entropy(signals["se"], group_ids, num_groups)
        signals["num_clusters"] = clusters_per_group(cluster_ids, group_ids, num_groups).float()
        metrics.update(se_metrics)
        metrics.update(_summary("num_clusters", signals["num_clusters"]))
    if embeddings is not None:
        if center == "batch":
            embeddings = center_embeddings(embeddings, reduce)  # [N, d]
        signals["cd"], cd_metrics = cosine_dispersion(embeddings, group_ids, num_groups)
        metrics.update(cd_metrics)
        if cluster_ids is not None:
            signals["bot"], bot_metrics = barycentric_transport(
                embeddings, cluster_ids, group_ids, num_groups, seq_logprobs, se_kind
            )
            metrics.update(bot_metrics)
    if geometric not in GEOMETRIC_SIGNALS:
        raise ValueError(f"unknown geometric signal {geometric!r}; valid: {', '.join(GEOMETRIC_SIGNALS)}")
    if geometric in signals:
        signals["u_c"] = calibrated_uncertainty(signals[geometric], signals["rd"])
        metrics.update(_summary("u_c", signals["u_c"]))
    return signals, metrics
