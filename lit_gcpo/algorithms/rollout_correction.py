"""Corrections for tokens not sampled by the policy being trained (METHODS.md section 2).

- Rollout correction (TRL 1.16's ``vllm_importance_sampling_mode``): when the tokens were sampled by an engine
  with its own copy of the policy, each token's loss is multiplied by a ratio of the trainer's to the engine's
  probabilities, per token or per sequence, truncated to [C_min, C_max] or zeroed outside it. ``token_truncate``
  with C_min None is Yao et al. 2025's truncated importance sampling ("Your efficient RL framework secretly
  brings you off-policy RL training"): min(exp(old_trainer - old_engine), C).
- Off-policy sequence masking (DeepSeek-V3.2, eq. 9; TRL's ``off_policy_mask_threshold``): a sequence with a
  negative advantage whose sampling policy is more than delta (mean token KL) away from the current one is
  left out of the policy loss.

Both give a detached multiplier of the clipped-surrogate token loss (``lit_gcpo.algorithms.losses.grpo_loss``
applies it) and ``(value, metrics)`` with 0-d detached metrics; "over mask tokens" means where ``mask > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_gcpo.algorithms.masking import check_token_shapes, masked_mean
from lit_gcpo.algorithms.registry import Registry

RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class RolloutCorrection:
    """One of TRL 1.16's ``vllm_importance_sampling_mode`` values.

    Attributes:
        level: ``token`` (a ratio per token) or ``sequence`` (one ratio per sequence, on all its tokens).
        masks: True: a ratio outside ``[C_min, C_max]`` becomes 0 (``*_mask``); False: it is clamped onto the
            nearer bound (``*_truncate``).
    """

    level: str
    masks: bool


ROLLOUT_CORRECTIONS: Registry[RolloutCorrection] = Registry("rollout correction mode")
for _level in RATIO_LEVELS:
    ROLLOUT_CORRECTIONS.add(f"{_level}_truncate", RolloutCorrection(_level, masks=False))
    ROLLOUT_CORRECTIONS.add(f"{_level}_mask", RolloutCorrection(_level, masks=True))


def rollout_correction_problem(mode: str | None, c_min: float | None, c_max: float | None) -> str | None:
    """Why ``(mode, C_min, C_max)`` is refused, or None; the message starts with the module option at fault.

    TRL 1.16's ``GRPOConfig`` refuses C_min >= C_max and a ``*_truncate`` mode without either bound; signs are
    checked here too (a ratio is >= 0, so C_min < 0 bounds nothing and C_max <= 0 would drop or zero everything).
    ``mode`` None is correction off: nothing to check.
    """
    if mode is None:
        return None
    if mode not in ROLLOUT_CORRECTIONS:
        return f"rollout_correction: unknown mode {mode!r}; valid names: {', '.join(ROLLOUT_CORRECTIONS.names())}"
    if c_min is not None and c_min < 0:
        return f"rollout_correction_min must be >= 0 (or None), got {c_min}"
    if c_max is not None and c_max <= 0:
        return f"rollout_correction_max must be > 0 (or None), got {c_max}"
    if c_min is not None and c_max is not None and c_min >= c_max:
        return f"rollout_correction_min ({c_min}) must be less than rollout_correction_max ({c_max})"
    if not ROLLOUT_CORRECTIONS.get(mode).masks and c_min is None and c_max is None:
        return f"rollout_correction_max: the mode {mode!r} truncates, so it needs C_min or C_max (both are None)"
    return None


def rollout_correction_weights(
    trainer_old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    mode: str = "token_truncate",
    c_min: float | None = None,
    c_max: float | None = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights between the trainer's and the rollout engine's log-probs, as TRL 1.16 computes them.

    The engine (vLLM) samples from its own copy of the policy, whose log-probs differ from the trainer's (other
    kernels, precision, a stale copy). TRL 1.16 (``vllm_importance_sampling_mode``, ``GRPOTrainer
    ._generate_and_score_completions``) corrects the loss by a ratio of the two, the project's reading of it:

    - ``d_t = old_trainer_t - old_engine_t`` on completion tokens (0 on padding; a NaN, a token the engine could
      not score, counts as 0, i.e. no correction).
    - ``token_*``: ``rho_t = exp(d_t)``. ``sequence_*``: ``rho_i = exp(sum_t d_t)``, the ratio of the sequence
      probabilities (a sum, not GSPO's length-normalised mean), the same on every token of the sequence.
    - ``*_truncate``: ``clamp(rho, C_min, C_max)`` (Yao et al. 2025's truncated IS when C_min is None).
      ``*_mask``: ``rho`` where ``C_min <= rho <= C_max`` (the bounds are inside), else 0: the token or the whole
      sequence then adds 0 to the loss but stays in the normaliser (TRL multiplies the loss, it does not edit the
      completion mask). A None bound is no bound.
    - The weight multiplies the clipped-surrogate token loss only (not the KL or entropy terms), without gradient.

    Args:
        trainer_old_logp: the trainer's log-probs of the sampled tokens at sampling time, ``[N, L]``.
        engine_logp: the engine's log-probs of the same tokens, ``[N, L]``.
        mask: 1 on completion tokens, ``[N, L]``.
        mode: a name in ``ROLLOUT_CORRECTIONS``: ``token_truncate``, ``token_mask``, ``sequence_truncate``,
            ``sequence_mask``.
        c_min: C_min, or None (no lower bound).
        c_max: C_max, or None (no upper bound; TRL's default is 3.0, lit-gcpo's 2.0).

    Returns:
        ``(weights [N, L], metrics)``; detached, 1 on padding. Metrics: ``mismatch_abs_mean`` /
        ``mismatch_abs_max`` (|d_t| over mask tokens that are not NaN, TRL's ``sampling_logp_difference``);
        ``correction_ratio_min`` / ``_mean`` / ``_max`` (the weights after the bounds, over mask tokens, or for
        ``sequence_*`` over sequences with a mask token; TRL also counts the empty ones; +inf / -inf / 0 when there
        are none); ``correction_masked_token_frac`` and ``correction_masked_seq_frac`` (``*_mask``) or
        ``correction_truncated_token_frac`` and ``correction_truncated_seq_frac`` (``*_truncate``): the share of
        mask tokens whose ratio was outside the bounds, and of the N sequences with at least one such token.
    """
    problem = rollout_correction_problem(mode, c_min, c_max)
    if problem is not None:
        raise ValueError(problem)
    check_token_shapes({"trainer_old_logp": trainer_old_logp, "engine_logp": engine_logp, "mask": mask})
    spec = ROLLOUT_CORRECTIONS.get(mode)
    with torch.no_grad():
        on = mask > 0  # [N, L]
        mask_f = mask.to(trainer_old_logp.dtype)  # [N, L]
        raw = trainer_old_logp - engine_logp  # [N, L]
        diff = torch.where(on, raw.nan_to_num(nan=0.0), torch.zeros_like(raw))  # [N, L]
        log_ratio = diff.sum(-1, keepdim=True) if spec.level == "sequence" else diff  # [N, 1] or [N, L]
        # exp first, then the bounds, as TRL does: a clamped ratio is the bound itself, and exp(+big) = inf is
        # clamped to C_max (or masked) rather than overflowing.
        ratio = log_ratio.exp()  # [N, 1] or [N, L]
        outside = torch.zeros_like(ratio, dtype=torch.bool)
        if c_min is not None:
            outside |= ratio < c_min
        if c_max is not None:
            outside |= ratio > c_max
        bounded = ratio.masked_fill(outside, 0.0) if spec.masks else ratio.clamp(min=c_min, max=c_max)
        weights = torch.where(on, bounded.expand_as(diff), torch.ones_like(diff))  # [N, L]

        outside_tokens = outside.expand_as(diff) & on  # [N, L]
        scored = on & ~raw.isnan()  # [N, L]
        gap = torch.where(scored, raw.abs(), torch.zeros_like(raw))  # [N, L]
        counted = on.any(-1, keepdim=True) if spec.level == "sequence" else on  # [N, 1] or [N, L]
        kind = "masked" if spec.masks else "truncated"
        metrics = {
            "mismatch_abs_mean": masked_mean(gap, scored.to(gap.dtype)),
            "mismatch_abs_max": gap.max() if gap.numel() else gap.new_zeros(()),
            "correction_ratio_min": torch.where(counted, bounded, float("inf")).min(),
            "correction_ratio_mean": masked_mean(bounded, counted.to(bounded.dtype)),
            "correction_ratio_max": torch.where(counted, bounded, float("-inf")).max(),
            f"correction_{kind}_token_frac": masked_mean(outside_tokens.to(mask_f.dtype), mask_f),
            f"correction_{kind}_seq_frac": outside_tokens.any(-1).to(mask_f.dtype).mean(),
        }
    return weights, metrics


def off_policy_sequence_mask(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    threshold: float,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556, eq. 9), as TRL 1.16's
    ``off_policy_mask_threshold`` computes it (``GRPOTrainer.get_off_policy_mask``).

    A sequence is dropped from the loss when its advantage is negative AND the policy has moved far from the one
    that sampled it: ``KL_i = sum_t m (behaviour_t - logp_t) / max(sum_t m, 1) > delta`` (the k1 estimate of
    KL(behaviour || current) from the sampled tokens, signed, a NaN token counting 0). Kept: ``A_i >= 0`` or
    ``KL_i <= delta``. The keep indicator multiplies the token loss like the importance weights: a dropped
    sequence still counts in the normaliser. ``logp`` is the current policy's (it changes between the optimizer
    steps of one rollout); ``behaviour_logp`` is what sampled the tokens: TRL takes the engine's log-probs when
    the engine reports them and the trainer's old log-probs otherwise (on-policy these are ``logp`` itself: KL 0).

    Args:
        logp: current policy's log-probs, ``[N, L]`` (the gradient is not used).
        behaviour_logp: log-probs of the sampling policy, ``[N, L]``.
        advantages: one per completion, ``[N]``.
        mask: 1 on completion tokens, ``[N, L]``.
        threshold: delta > 0.
        num_tokens: the count the token share is taken of (default: this call's mask tokens); give the batch's
            to make micro-batch shares add up, as in ``aggregate_loss``.
        num_seqs: the same for the sequence share (default: N).

    Returns:
        ``(keep [N], metrics)``: keep is 1.0 or 0.0, detached. Metrics: ``off_policy_masked_seq_frac`` and
        ``off_policy_masked_token_frac`` (dropped sequences and their mask tokens, shares of the counts),
        ``off_policy_kl_mean`` (behaviour - logp over mask tokens) and ``off_policy_kl_max`` (the largest KL_i).
    """
    if threshold <= 0:
        raise ValueError(f"off_policy_mask_threshold must be > 0, got {threshold}")
    check_token_shapes({"logp": logp, "behaviour_logp": behaviour_logp, "mask": mask}, advantages)
    with torch.no_grad():
        on = mask > 0  # [N, L]
        mask_f = mask.to(logp.dtype)  # [N, L]
        raw = behaviour_logp.to(logp.dtype) - logp.detach()  # [N, L]
        kl = torch.where(on, raw.nan_to_num(nan=0.0), torch.zeros_like(raw))  # [N, L]
        seq_kl = kl.sum(-1) / mask_f.sum(-1).clamp_min(1)  # [N]
        keep = (advantages.detach() >= 0) | (seq_kl <= threshold)  # [N]
        dropped = ~keep  # [N]
        tokens = mask_f.sum().clamp_min(1) if num_tokens is None else num_tokens
        seqs = max(logp.shape[0], 1) if num_seqs is None else num_seqs
        metrics = {
            "off_policy_masked_seq_frac": dropped.to(mask_f.dtype).sum() / seqs,
            "off_policy_masked_token_frac": (mask_f * dropped.unsqueeze(-1)).sum() / tokens,
            "off_policy_kl_mean": masked_mean(kl, mask_f),
            "off_policy_kl_max": torch.where(on.any(-1), seq_kl, float("-inf")).max(),
        }
    return keep.to(logp.dtype), metrics
