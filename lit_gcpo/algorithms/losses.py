"""Per-token policy loss, KL penalty, entropy bonus and loss aggregation (METHODS.md section 2).

- Policy-gradient surrogates (``lit_gcpo.algorithms.surrogates``, chosen by name): PPO / GRPO / DAPO / GSPO's clipped
  surrogate (``policy_loss``, re-exported here), CISPO, SAPO and VESPO.
- Rollout correction and off-policy sequence masking: ``lit_gcpo.algorithms.rollout_correction``; the
  weights and the keep indicator they give multiply the surrogate's token loss here (VESPO folds the correction's
  weights into its own sequence weight instead).
- Token selection (``lit_gcpo.algorithms.token_selection``): keep masks multiplied into ``is_weights``, and
  KL-Cov's penalty added to the policy-gradient token loss (``token_penalty``).
- KL to the reference (Schulman's "Approximating KL divergence" note): k1, k2, k3 (default, GRPO eq. 4).
- Entropy bonus: token loss -= c_H * H_t.

Aggregation (one function for all modes, see ``aggregate_loss``) normalises by counts the caller may
give for the whole batch, so that summing micro-batch losses equals the full-batch loss exactly.

Conventions: every function takes tensors and plain numbers and returns ``(value, metrics)`` except
``aggregate_loss``, which returns the scalar only. Metrics are 0-d detached tensors (no host-device
sync); "over mask tokens" means over the positions where ``mask > 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lit_gcpo.algorithms.masking import check_token_shapes, masked_mean
from lit_gcpo.algorithms.registry import Registry
from lit_gcpo.algorithms.rollout_correction import (  # noqa: F401 - re-exported: their home before the split
    RATIO_LEVELS,
    ROLLOUT_CORRECTIONS,
    RolloutCorrection,
    off_policy_sequence_mask,
    rollout_correction_problem,
    rollout_correction_weights,
)
from lit_gcpo.algorithms.surrogates import SURROGATES, policy_loss  # noqa: F401 - policy_loss: re-exported

# A KL estimator maps the per-token log-ratio log(ref / pi) = ref - logp to a per-token KL estimate.
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(ref_log_ratio: Tensor) -> Tensor:
    return -ref_log_ratio  # logp - ref


@KL_ESTIMATORS.register("k2")
def _k2(ref_log_ratio: Tensor) -> Tensor:
    return 0.5 * ref_log_ratio.square()  # 0.5 (logp - ref)^2


@KL_ESTIMATORS.register("k3")
def _k3(ref_log_ratio: Tensor) -> Tensor:
    return ref_log_ratio.exp() - ref_log_ratio - 1.0  # exp(ref - logp) - (ref - logp) - 1


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, estimator: str = "k3", *, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens.

    Args:
        logp: current policy's log-probs, ``[N, L]`` (carries the gradient).
        ref_logp: the frozen reference's log-probs, ``[N, L]`` (no gradient).
        estimator: a name in ``KL_ESTIMATORS`` (``k1``, ``k2``, ``k3``).
        mask: 1 on completion tokens; when given the KL is 0 on padding and metrics are over mask tokens.

    Returns:
        ``(kl [N, L], metrics)`` with ``kl_mean`` and ``kl_max``. k3 is not clamped: a token the
        reference finds e^20 times likelier than the policy does is reported, not hidden.
    """
    fn = KL_ESTIMATORS.get(estimator)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp must share one shape, got {tuple(logp.shape)}, {tuple(ref_logp.shape)}")
    ref_log_ratio = ref_logp.detach() - logp  # [N, L]
    if mask is not None:
        on = mask > 0
        ref_log_ratio = torch.where(on, ref_log_ratio, torch.zeros_like(ref_log_ratio))
    kl = fn(ref_log_ratio)  # [N, L]
    with torch.no_grad():
        k = kl.detach()
        mask_f = torch.ones_like(k) if mask is None else mask.to(k.dtype)
        metrics = {
            "kl_mean": masked_mean(k, mask_f),
            "kl_max": (k if mask is None else torch.where(mask > 0, k, float("-inf"))).max(),
        }
    return kl, metrics


# An aggregation maps (token_loss [N, L], mask [N, L], num_tokens, num_seqs, max_len) to a scalar.
Count = float | Tensor | None
Aggregation = Callable[[Tensor, Tensor, Count, Count, "int | None"], Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def _token_mean(loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count, max_len: int | None) -> Tensor:
    # DAPO's token-level loss (section 3.3): every token of the batch weighs the same.
    denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
    return (loss * mask).sum() / denom


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count, max_len: int | None) -> Tensor:
    # GRPO (DeepSeekMath eq. 3): mean over sequences of the per-sequence token mean.
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [N]
    denom = loss.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / denom


@AGGREGATIONS.register("seq_mean_token_sum")
def _seq_mean_token_sum(loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count, max_len: int | None) -> Tensor:
    # LUSPO (Liu et al. 2026, arXiv 2602.05261; TRL's luspo): GSPO's sequence loss times the sequence's length, i.e.
    # the sum over its tokens of the sequence-ratio token loss, averaged over sequences.
    denom = loss.shape[0] if num_seqs is None else num_seqs
    return (loss * mask).sum() / denom


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(
    loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count, max_len: int | None
) -> Tensor:
    # Dr. GRPO (as in its oat code): a constant normaliser N_seq * L_max, free of length bias.
    if max_len is None or max_len <= 0:
        raise ValueError(
            f"aggregation 'seq_mean_token_sum_norm' needs max_len = L_max (the configured maximum "
            f"completion length) > 0, got {max_len}"
        )
    denom = loss.shape[0] if num_seqs is None else num_seqs
    return (loss * mask).sum() / (denom * max_len)


def aggregate_loss(
    token_loss: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Masked token-loss matrix -> scalar loss; one function for all modes (METHODS.md section 2).

    ``token_mean``: sum m l / num_tokens. ``seq_mean_token_mean``: sum_i (sum_t m l / sum_t m) / num_seqs.
    ``seq_mean_token_sum_norm``: sum m l / (num_seqs * max_len). ``seq_mean_token_sum`` (LUSPO): sum m l / num_seqs.

    When a batch is split into micro-batches (or data-parallel ranks), pass the GLOBAL ``num_tokens``
    (sum of the mask over the whole batch) and ``num_seqs`` (number of completions of the whole batch):
    the micro-batch losses then sum to the full-batch loss exactly. The defaults are the local counts
    (local token count clamped to >= 1). Given counts are used as they are.

    Args:
        token_loss: per-token loss, ``[N, L]``.
        mask: 1 on completion tokens, ``[N, L]``.
        mode: a name in ``AGGREGATIONS``.
        num_tokens: global number of mask tokens (``token_mean``).
        num_seqs: global number of sequences (the ``seq_mean_*`` modes).
        max_len: L_max, the configured maximum completion length (``seq_mean_token_sum_norm`` only).

    Returns:
        The 0-d loss.
    """
    fn = AGGREGATIONS.get(mode)
    if token_loss.shape != mask.shape or token_loss.ndim != 2:
        raise ValueError(
            f"token_loss and mask must share one [N, L] shape, got {tuple(token_loss.shape)}, {tuple(mask.shape)}"
        )
    # where, not multiply: a NaN on padding must not leak into the sum (0 * NaN = NaN).
    token_loss = torch.where(mask > 0, token_loss, torch.zeros_like(token_loss))  # [N, L]
    return fn(token_loss, mask.to(token_loss.dtype), num_tokens, num_seqs, max_len)


def _surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    surrogate: str,
    options: Mapping[str, float] | None,
    clip: Mapping[str, float | None],
    ratio_level: str,
    is_weights: Tensor | None,
    correction: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """``grpo_loss``'s surrogate token loss ``[N, L]``, its metrics, and the weights that multiplied it (``is_weights``
    times ``correction`` unless the surrogate folds the correction into its own weight)."""
    entry = SURROGATES.get(surrogate)
    if surrogate == "clip":
        if options:
            raise ValueError(f"the clipped surrogate takes eps_low, eps_high and dual_clip, not {dict(options)}")
        options = clip
    elif clip["dual_clip"] is not None:
        raise ValueError(f"dual_clip caps the clipped surrogate's loss; surrogate {surrogate!r} has no such cap")
    options = dict(options or {})
    if entry.folds_correction:
        options["correction"] = correction
    elif correction is not None:
        is_weights = correction if is_weights is None else is_weights * correction  # [N, L]
    loss, metrics = entry.loss(
        logp, old_logp, advantages, mask, ratio_level=ratio_level, is_weights=is_weights, **options
    )
    return loss, metrics, is_weights


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    surrogate: str = "clip",
    surrogate_options: Mapping[str, float] | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    is_weights: Tensor | None = None,
    correction: Tensor | None = None,
    token_penalty: Tensor | None = None,
    off_policy_threshold: float | None = None,
    behaviour_logp: Tensor | None = None,
    aggregation: str = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The full GRPO-family objective: policy loss + beta * KL - entropy_coef * H, aggregated.

    Arguments are those of the surrogate, ``kl_penalty`` and ``aggregate_loss``; ``ref_logp`` is
    required when ``beta != 0`` and ``entropy`` (``[N, L]``, the policy's token entropy, with gradient)
    when ``entropy_coef != 0``. The KL and entropy terms are aggregated with the same mode as the policy
    loss (aggregation is linear, so the total equals aggregating the summed token matrix).
    ``surrogate`` names the policy loss in ``lit_gcpo.algorithms.surrogates.SURROGATES`` (``clip``: ``policy_loss``
    with ``eps_low``, ``eps_high``, ``dual_clip``; the others take ``surrogate_options``, e.g. ``{"max_ratio": 5.0}``
    for ``cispo``). ``correction`` (``[N, L]``, the rollout correction's weights) multiplies the token loss like
    ``is_weights``, except for a surrogate that folds it into its own weight (``vespo``).
    ``off_policy_threshold`` (delta, None: off) drops negative-advantage sequences whose ``behaviour_logp``
    (default ``old_logp``, as TRL falls back to its old log-probs) are more than delta away from ``logp``
    (``off_policy_sequence_mask``; its shares are of ``num_tokens`` / ``num_seqs``); the keep indicator
    multiplies ``is_weights``. ``token_penalty`` (``[N, L]``, with gradient; KL-Cov's
    ``lit_gcpo.algorithms.token_selection.kl_cov_penalty``) is added to the policy-gradient token loss before the
    weights, so ``is_weights`` multiply it too, as verl applies its rollout weights to KL-Cov's penalised loss.

    Returns:
        ``(loss, metrics)``: the 0-d loss, and the metrics of the surrogate and ``kl_penalty`` plus
        ``policy_loss``, ``kl_loss``, ``entropy_loss`` (aggregated terms, before their coefficients) and
        ``entropy_mean`` (over mask tokens). Metrics are over this call's tokens only: when the caller
        splits a batch, it averages them itself.
    """
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta = {beta} needs ref_logp (the reference model's log-probs)")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef = {entropy_coef} needs the token entropy tensor")

    def aggregate(token_loss: Tensor) -> Tensor:
        return aggregate_loss(token_loss, mask, aggregation, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    off_policy_metrics: dict[str, Tensor] = {}
    if off_policy_threshold is not None:
        behaviour = old_logp if behaviour_logp is None else behaviour_logp
        keep, off_policy_metrics = off_policy_sequence_mask(
            logp, behaviour, advantages, mask, off_policy_threshold, num_tokens=num_tokens, num_seqs=num_seqs
        )  # [N]
        keep = keep.unsqueeze(-1).expand_as(logp)  # [N, L]
        is_weights = keep if is_weights is None else is_weights * keep
    clip = {"eps_low": eps_low, "eps_high": eps_high, "dual_clip": dual_clip}
    pg, metrics, is_weights = _surrogate_loss(
        logp, old_logp, advantages, mask, surrogate, surrogate_options, clip, ratio_level, is_weights, correction
    )  # [N, L]
    if token_penalty is not None:
        check_token_shapes({"logp": logp, "token_penalty": token_penalty})
        pg = pg + (token_penalty if is_weights is None else token_penalty * is_weights.detach())  # [N, L]
    metrics.update(off_policy_metrics)
    pg_loss = aggregate(pg)
    loss = pg_loss
    metrics["policy_loss"] = pg_loss.detach()
    if beta != 0.0:
        kl, kl_metrics = kl_penalty(logp, ref_logp, kl_estimator, mask=mask)  # [N, L]
        kl_loss = aggregate(kl)
        loss = loss + beta * kl_loss
        metrics.update(kl_metrics)
        metrics["kl_loss"] = kl_loss.detach()
    if entropy is not None:
        with torch.no_grad():
            metrics["entropy_mean"] = masked_mean(entropy.detach(), mask.to(entropy.dtype))
    if entropy_coef != 0.0:
        entropy_loss = aggregate(entropy)
        loss = loss - entropy_coef * entropy_loss
        metrics["entropy_loss"] = entropy_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
