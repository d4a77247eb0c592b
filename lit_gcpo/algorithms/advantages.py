"""Group-relative advantages of GRPO and Dr. GRPO (METHODS.md section 1).

- ``grpo`` (Shao et al. 2024, DeepSeekMath section 4.1.2, outcome supervision): A_i = (r_i - mean_g r) /
  (std_g r + eps), with the unbiased (N - 1) std and eps = 1e-4, as TRL's GRPOTrainer.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_g r,
  no std division; SEED-GRPO builds on it.
- ``scale="batch"`` divides by the std of all finite rewards of the batch instead of the group's
  (the project's reading of "batch scaling": raw rewards, not group-centred ones, as TRL's
  ``scale_rewards="batch"``); it only affects modes that divide by a std.

Where the papers leave a gap, the project reads:

- A group whose finite rewards are all equal (max - min == 0, or fewer than two finite rewards) gets
  A = 0 exactly: float noise of ``r - mean`` is never divided by a tiny std.
- A non-finite reward (NaN / +-inf, e.g. every reward function failed) is a data error: that completion
  gets A = 0, is left out of its group's mean and std, and is counted in ``nonfinite_rewards``.

Everything is vectorised with ``index_add_`` / ``scatter_reduce_`` over ``group_ids``: groups may have
unequal sizes and need not be contiguous, and there is no Python loop over groups.

Metrics are 0-d detached tensors (no host-device sync); the caller converts them when logging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_gcpo.algorithms.registry import Registry

# A mode maps (group-centred rewards [N], the std it may divide by [N], eps) to advantages [N].
AdvantageMode = Callable[[Tensor, Tensor, float], Tensor]
ADVANTAGE_MODES: Registry[AdvantageMode] = Registry("advantage mode")
ADVANTAGE_SCALES = ("group", "batch")


@ADVANTAGE_MODES.register("grpo")
def _grpo(centered: Tensor, std: Tensor, eps: float) -> Tensor:
    return centered / (std + eps)  # [N]


@ADVANTAGE_MODES.register("dr_grpo")
def _dr_grpo(centered: Tensor, std: Tensor, eps: float) -> Tensor:
    return centered  # [N]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    num_groups: int | None = None,
    mode: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-completion advantages from per-completion rewards and their group ids.

    Args:
        rewards: scalar reward of each completion, ``[N]`` float (NaN / inf allowed, see module doc).
        group_ids: group (prompt) index of each completion, ``[N]`` long, values in ``[0, num_groups)``.
        num_groups: number of groups; ``None`` reads ``group_ids.max() + 1`` (one host sync).
        mode: a name in ``ADVANTAGE_MODES`` (``grpo``, ``dr_grpo``).
        scale: ``group`` (the group's std) or ``batch`` (the std of all finite rewards of the batch).
        eps: added to the std before dividing (``grpo`` only).
        all_reduce_sum: sums a tensor over data-parallel ranks; with ``scale="batch"`` the std is then that of
            every rank's finite rewards (the global batch), not this rank's.

    Returns:
        ``(advantages [N], metrics)``; advantages have the rewards' dtype (float32 for integer rewards).
        Metrics: ``zero_spread_frac`` (fraction of non-empty groups with no reward spread),
        ``nonfinite_rewards`` (count), ``reward_mean`` / ``reward_std`` (finite rewards),
        ``advantage_mean`` / ``advantage_std`` / ``advantage_min`` / ``advantage_max`` /
        ``advantage_abs_mean``.
    """
    mode_fn = ADVANTAGE_MODES.get(mode)
    _check_inputs(rewards, group_ids, scale)
    if num_groups is None:
        num_groups = int(group_ids.max().item()) + 1

    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    rewards = rewards.to(dtype)
    finite = torch.isfinite(rewards)  # [N]
    r = torch.where(finite, rewards, torch.zeros_like(rewards))  # [N]
    finite_f = finite.to(dtype)  # [N]

    zeros_g = rewards.new_zeros(num_groups)  # [G]
    members = zeros_g.index_add(0, group_ids, torch.ones_like(r))  # [G] all completions
    counts = zeros_g.index_add(0, group_ids, finite_f)  # [G] finite rewards only
    mean = zeros_g.index_add(0, group_ids, r) / counts.clamp_min(1)  # [G]
    centered = torch.where(finite, r - mean[group_ids], torch.zeros_like(r))  # [N]

    # Spread test on the rewards themselves, not on `centered` (which carries the float noise of the mean).
    inf = float("inf")
    gmax = torch.full_like(zeros_g, -inf).scatter_reduce(
        0, group_ids, torch.where(finite, r, -inf), reduce="amax"
    )  # [G]
    gmin = torch.full_like(zeros_g, inf).scatter_reduce(0, group_ids, torch.where(finite, r, inf), reduce="amin")  # [G]
    has_spread = gmax > gmin  # [G] False for groups with < 2 finite rewards, too

    if scale == "group":
        sq = zeros_g.index_add(0, group_ids, centered.square())  # [G]
        std = (sq / (counts - 1).clamp_min(1)).sqrt()[group_ids]  # [N] unbiased
    else:
        std = _batch_std(r, finite_f, all_reduce_sum).expand_as(r)  # [N]

    raw = mode_fn(centered, std, eps)  # [N]
    keep = finite & has_spread[group_ids]  # [N]
    advantages = torch.where(keep, raw, torch.zeros_like(raw))  # [N]

    metrics = _metrics(advantages, r, finite, has_spread, members > 0)
    return advantages, metrics


def _check_inputs(rewards: Tensor, group_ids: Tensor, scale: str) -> None:
    """Raise ``ValueError`` naming the argument unless ``rewards`` is ``[N]`` (N > 0), ``group_ids`` a long ``[N]``
    and ``scale`` one of ``ADVANTAGE_SCALES``."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid names: {', '.join(ADVANTAGE_SCALES)}")
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    if group_ids.dtype != torch.long:
        raise ValueError(f"group_ids must be torch.long, got {group_ids.dtype}")


def _batch_std(r: Tensor, finite_f: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The unbiased std ``[]`` of the finite rewards (``r`` ``[N]`` with 0 where ``finite_f`` is 0), over every
    rank's when ``all_reduce_sum`` is given: from the summed moments [count, sum, sum of squares]."""
    moments = torch.stack([finite_f.sum(), r.sum(), r.square().sum()])  # [3]
    if all_reduce_sum is not None:
        moments = all_reduce_sum(moments)
    n_finite, total, total_sq = moments.unbind()
    batch_var = (total_sq - total.square() / n_finite.clamp_min(1)).clamp_min(0) / (n_finite - 1).clamp_min(1)
    return batch_var.sqrt()


def _metrics(advantages: Tensor, r: Tensor, finite: Tensor, has_spread: Tensor, nonempty: Tensor) -> dict[str, Tensor]:
    """``group_advantages``' metrics (its docstring) from the advantages ``[N]``, the rewards ``r`` ``[N]`` (0 where
    not ``finite``), and per group ``[G]`` whether it has spread and any member."""
    dtype = r.dtype
    with torch.no_grad():
        finite_f = finite.to(dtype)  # [N]
        n_finite = finite_f.sum()
        reward_mean = r.sum() / n_finite.clamp_min(1)
        reward_var = torch.where(finite, r - reward_mean, 0.0).square().sum() / (n_finite - 1).clamp_min(1)
        adv = advantages.detach()
        return {
            "zero_spread_frac": (~has_spread & nonempty).to(dtype).sum() / nonempty.to(dtype).sum(),
            "nonfinite_rewards": (~finite).to(dtype).sum(),
            "reward_mean": reward_mean,
            "reward_std": reward_var.sqrt(),
            "advantage_mean": adv.mean(),
            "advantage_std": adv.std(correction=0),
            "advantage_min": adv.min(),
            "advantage_max": adv.max(),
            "advantage_abs_mean": adv.abs().mean(),
        }
