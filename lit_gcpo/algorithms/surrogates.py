"""The policy-gradient surrogates: the per-token policy loss before aggregation (METHODS.md section 2).

Notation: r = exp(logp - old) per token (``ratio_level`` token), or GSPO's sequence ratio
s_i = exp(mean_t m (logp - old)) on every token of completion i (``ratio_level`` sequence, where a surrogate allows
it); A_i the completion's advantage; sg the stop-gradient. Each surrogate is chosen by name in ``SURROGATES``
(``lit_gcpo.algorithms.losses.grpo_loss``'s ``surrogate``), takes the same tensors and returns
``(token_loss [N, L], metrics)``, the loss 0 on padding and multiplied by ``is_weights`` (detached) when given.

- ``clip`` (``policy_loss``): PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as GRPO uses it (Shao et al.
  2024, eq. 3), l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); eps_high > eps_low is DAPO's clip-higher (Yu
  et al. 2025, section 3.1); ``dual_clip`` c caps the loss of A < 0 at -c A (Ye et al. 2020); with the sequence ratio
  it is GSPO (Zheng et al. 2025), whose paper uses a far smaller clip range (3e-4 / 4e-4). The loss stays a token
  matrix so that every variant goes through the same aggregation (``seq_mean_token_mean`` gives GSPO's objective).
- ``cispo`` (MiniMax-M1, arXiv 2506.13585, section 3.1; TRL 1.16 ``loss_type="cispo"``): l = -sg(min(r, max_ratio))
  A log pi. The importance weight is clipped, not the update: every token keeps a gradient. The paper writes
  clip(r, 1 - eps_low^IS, 1 + eps_high^IS) with eps_low^IS so large that the lower bound never acts: upper clip
  only here, ``max_ratio`` = 1 + eps_high^IS (ScaleRL's eps_max, TRL's ``epsilon_high`` under cispo). Token ratios
  only, as in the paper; its optional token mask (a PPO-like trust region, eq. 7) is not implemented.
- ``sapo`` (Gao et al. 2025, arXiv 2511.20347; TRL ``sapo``): l = -f(r) A with f(x) = sigmoid(tau (x - 1)) 4 / tau,
  tau = tau_pos when A > 0, else tau_neg (A = 0 adds nothing either way). Its gradient is g(r) r A grad log pi with
  the soft gate g = 4 sigmoid (1 - sigmoid), 1 at r = 1 and decaying smoothly away from it, in place of the hard
  clip. Token ratios as in the paper, or the sequence ratio (TRL allows it).
- ``vespo`` (Shen et al. 2026, arXiv 2602.10693; the authors' verl recipe ``recipe/vespo``; TRL ``vespo``):
  l = -sg(phi(w_i)) A log pi, w_i the completion's importance weight, the product of its token ratios (no length
  normalisation), phi(w) = exp(lambda) w^k exp(-lambda w) (phi(1) = 1), (k, lambda) = (k_pos, lambda_pos) for
  A >= 0, else (k_neg, lambda_neg). The numerics are the authors' (and TRL's): token log-ratios clamped to
  [-20, 20], log w to [log 1e-8, 20], a non-finite phi set to 0. VESPO forms its own sequence weight, so the
  ratio level is token only. The rollout correction's token weights (pi_old / pi_engine, ``correction``) are folded
  into w in log space, each clamped to [log 1e-8, 20], instead of multiplying the loss (as the authors and TRL do);
  project's reading where TRL differs: summed over completion tokens only (TRL also sums its padding columns,
  whose weight is 1 unless a bound excludes 1).

Metrics (0-d, detached; means over mask tokens): every surrogate gives ``approx_kl`` (k3 of KL(old || current),
r - 1 - log r with the token ratio) and ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (the ratio used; +inf / -inf
for an empty mask). ``clip``: ``clip_frac_low``, ``clip_frac_high`` (the clipped branch active), ``dual_clip_frac``.
``cispo``: ``cispo_clip_frac`` (r > max_ratio, either sign of A; TRL's ``cispo_clip_ratio`` counts A > 0 only).
``sapo``: ``sapo_gate_mean``, ``sapo_gate_min`` (g per token). ``vespo``: ``vespo_phi_mean`` (each token weighing
its completion's phi), ``vespo_phi_min``, ``vespo_phi_max`` (over completions with a mask token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_gcpo.algorithms.masking import check_token_shapes, masked_mean
from lit_gcpo.algorithms.registry import Registry
from lit_gcpo.algorithms.rollout_correction import RATIO_LEVELS

Metrics = dict[str, Tensor]

VESPO_LOG_W_RANGE = (math.log(1e-8), 20.0)
"""The clamp of log w and of each correction log-weight (the authors' code: w >= 1e-8, log w <= 20)."""
VESPO_TOKEN_LOG_RATIO_BOUND = 20.0
"""Each token's log-ratio is clamped to [-20, 20] before the sum (the authors' code)."""


def validate_cispo(max_ratio: float) -> None:
    """CISPO's cap is >= 1: the weight is 1 on-policy, and a cap below 1 would shrink every token's gradient (TRL
    caps at ``epsilon_high``, which is ``epsilon`` = 0.2 unless set: set it, TRL recommends 5.0)."""
    if not max_ratio >= 1.0:
        raise ValueError(f"cispo's max_ratio (the importance weight's cap) must be >= 1, got {max_ratio}")


def validate_sapo(tau_pos: float, tau_neg: float) -> None:
    """SAPO's temperatures are > 0."""
    for name, tau in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not tau > 0:
            raise ValueError(f"sapo's {name} (the gate's temperature) must be > 0, got {tau}")


def validate_vespo(k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> None:
    """VESPO's exponents are >= 0 and its decays > 0 (lambda 0 would leave w^k unbounded; TRL clamps it to 1e-4)."""
    for name, value in (("k_pos", k_pos), ("k_neg", k_neg)):
        if not value >= 0:
            raise ValueError(f"vespo's {name} (the power of w) must be >= 0, got {value}")
    for name, value in (("lambda_pos", lambda_pos), ("lambda_neg", lambda_neg)):
        if not value > 0:
            raise ValueError(f"vespo's {name} (the decay of w) must be > 0, got {value}")


def _checked(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio_level: str, levels: tuple[str, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(on [N, L] bool, mask_f [N, L], log_ratio [N, L], adv [N, 1])`` after checking shapes and the ratio level."""
    if ratio_level not in levels:
        raise ValueError(f"ratio_level {ratio_level!r} is not one of this surrogate's: {', '.join(levels)}")
    check_token_shapes({"logp": logp, "old_logp": old_logp, "mask": mask}, advantages)
    on = mask > 0  # [N, L]
    # Padding may hold garbage (e.g. -inf log-probs): zero its log-ratio before exp.
    log_ratio = torch.where(on, logp - old_logp.detach(), torch.zeros_like(logp))  # [N, L]
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)  # [N, 1]
    return on, mask.to(logp.dtype), log_ratio, adv


def _by_sign(positive: Tensor, if_positive: float, otherwise: float, like: Tensor) -> Tensor:
    """``if_positive`` where ``positive``, else ``otherwise``, in ``like``'s dtype and device (not via float32)."""
    values = torch.tensor([otherwise, if_positive], dtype=like.dtype, device=like.device)  # [2]
    return values[positive.long()]


def importance_ratio(log_ratio: Tensor, mask_f: Tensor, ratio_level: str) -> Tensor:
    """``[N, L]``: exp of each token's log-ratio, or GSPO's exp(mean_t m log-ratio) on every token of its row."""
    if ratio_level == "sequence":
        seq_log_ratio = (log_ratio * mask_f).sum(-1) / mask_f.sum(-1).clamp_min(1)  # [N]
        return seq_log_ratio.exp().unsqueeze(-1).expand_as(log_ratio)
    return log_ratio.exp()


def _finish(loss: Tensor, on: Tensor, is_weights: Tensor | None) -> Tensor:
    """The token loss times ``is_weights`` (detached), 0 on padding."""
    if is_weights is not None:
        if is_weights.shape != loss.shape:
            raise ValueError(f"is_weights must be [N, L] = {tuple(loss.shape)}, got {tuple(is_weights.shape)}")
        loss = loss * is_weights.detach()  # [N, L]
    return torch.where(on, loss, torch.zeros_like(loss))


def ratio_metrics(log_ratio: Tensor, ratio: Tensor, mask_f: Tensor) -> Metrics:
    """``approx_kl`` (k3 from the token log-ratio) and ``ratio_mean`` / ``_min`` / ``_max`` of ``ratio``."""
    with torch.no_grad():
        on = mask_f > 0
        r, log_r = ratio.detach(), log_ratio.detach()
        return {
            "approx_kl": masked_mean(log_r.exp() - 1.0 - log_r, mask_f),
            "ratio_mean": masked_mean(r, mask_f),
            "ratio_min": torch.where(on, r, float("inf")).min(),
            "ratio_max": torch.where(on, r, float("-inf")).max(),
        }


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The clipped surrogate of PPO / GRPO / DAPO / GSPO (``clip``; the module docstring has the formula).

    Args:
        logp: current policy's log-prob of each sampled token, ``[N, L]`` (carries the gradient).
        old_logp: log-prob under the policy that generated the tokens, ``[N, L]`` (no gradient).
        advantages: one advantage per completion, ``[N]``.
        mask: 1 on completion tokens, 0 on padding, ``[N, L]``.
        eps_low: lower clip range, the ratio is clipped at ``1 - eps_low``.
        eps_high: upper clip range, the ratio is clipped at ``1 + eps_high``.
        dual_clip: c > 1 caps the loss of negative-advantage tokens at ``-c A``; None disables it.
        ratio_level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO's length-normalised sequence ratio).
        is_weights: per-token weights multiplied into the loss after clipping (``rollout_correction_weights``,
            the off-policy sequence mask, token selections), ``[N, L]``.

    Returns:
        ``(token_loss [N, L], metrics)``: ``clip_frac_low`` (ratio < 1 - eps_low with A < 0: the clipped branch is
        active), ``clip_frac_high`` (ratio > 1 + eps_high with A > 0), ``dual_clip_frac`` (A < 0 and the dual cap
        active), and ``ratio_metrics``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (typically 3), got {dual_clip}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid names: {', '.join(RATIO_LEVELS)}")
    on, mask_f, log_ratio, adv = _checked(logp, old_logp, advantages, mask, ratio_level, RATIO_LEVELS)
    ratio = importance_ratio(log_ratio, mask_f, ratio_level)  # [N, L]
    loss_unclipped = -ratio * adv  # [N, L]
    loss_clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv  # [N, L]
    loss = torch.maximum(loss_unclipped, loss_clipped)  # [N, L]
    dual_active = torch.zeros_like(on)
    if dual_clip is not None:
        cap = -dual_clip * adv  # [N, 1]
        dual_active = (adv < 0) & (loss > cap)  # [N, L]
        loss = torch.where(dual_active, cap.expand_as(loss), loss)  # [N, L]
    loss = _finish(loss, on, is_weights)  # [N, L]
    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "clip_frac_low": masked_mean(((r < 1.0 - eps_low) & (adv < 0)).to(mask_f.dtype), mask_f),
            "clip_frac_high": masked_mean(((r > 1.0 + eps_high) & (adv > 0)).to(mask_f.dtype), mask_f),
            "dual_clip_frac": masked_mean((dual_active & on).to(mask_f.dtype), mask_f),
        }
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, mask_f)}


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    max_ratio: float = 5.0,
    ratio_level: str = "token",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """CISPO: ``-sg(min(r, max_ratio)) A log pi`` per token (the module docstring has the paper and the choices).

    Args are ``policy_loss``'s; ``max_ratio`` >= 1 is the cap of the importance weight (TRL recommends 5.0).
    Returns ``(token_loss [N, L], metrics)``: ``cispo_clip_frac`` and ``ratio_metrics``.
    """
    validate_cispo(max_ratio)
    on, mask_f, log_ratio, adv = _checked(logp, old_logp, advantages, mask, ratio_level, ("token",))
    ratio = log_ratio.exp()  # [N, L]
    weight = ratio.detach().clamp(max=max_ratio)  # [N, L], no gradient: it scales grad log pi
    loss = -weight * adv * torch.where(on, logp, torch.zeros_like(logp))  # [N, L]
    loss = _finish(loss, on, is_weights)  # [N, L]
    with torch.no_grad():
        capped = masked_mean((ratio.detach() > max_ratio).to(mask_f.dtype), mask_f)
    return loss, {"cispo_clip_frac": capped, **ratio_metrics(log_ratio, ratio, mask_f)}


def sapo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ratio_level: str = "token",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """SAPO: ``-sigmoid(tau (r - 1)) 4 / tau A`` per token, tau by the sign of A (the module docstring).

    Args are ``policy_loss``'s; ``tau_pos`` / ``tau_neg`` > 0 are the gate's temperatures for A > 0 / A <= 0 (the
    paper's 1.0 and 1.05). Returns ``(token_loss [N, L], metrics)``: ``sapo_gate_mean``, ``sapo_gate_min`` and
    ``ratio_metrics``.
    """
    validate_sapo(tau_pos, tau_neg)
    on, mask_f, log_ratio, adv = _checked(logp, old_logp, advantages, mask, ratio_level, RATIO_LEVELS)
    ratio = importance_ratio(log_ratio, mask_f, ratio_level)  # [N, L]
    tau = _by_sign(adv > 0, tau_pos, tau_neg, logp)  # [N, 1]
    soft = torch.sigmoid(tau * (ratio - 1.0))  # [N, L]
    loss = _finish(-soft * (4.0 / tau) * adv, on, is_weights)  # [N, L]
    with torch.no_grad():
        gate = 4.0 * soft.detach() * (1.0 - soft.detach())  # [N, L], d f / d r
        metrics = {
            "sapo_gate_mean": masked_mean(gate, mask_f),
            "sapo_gate_min": torch.where(on, gate, float("inf")).min(),
        }
    return loss, {**metrics, **ratio_metrics(log_ratio, ratio, mask_f)}


def vespo_weights(
    log_ratio: Tensor,
    advantages: Tensor,
    mask_f: Tensor,
    k: tuple[float, float],
    lam: tuple[float, float],
    correction: Tensor | None = None,
) -> Tensor:
    """phi(w_i) ``[N]`` of VESPO (detached): ``log_ratio`` ``[N, L]`` (0 on padding), ``advantages`` ``[N]``,
    ``k`` / ``lam`` as (for A >= 0, for A < 0), ``correction`` the rollout correction's token weights ``[N, L]``."""
    low, high = VESPO_LOG_W_RANGE
    bound = VESPO_TOKEN_LOG_RATIO_BOUND
    with torch.no_grad():
        log_w = (log_ratio.detach().clamp(-bound, bound) * mask_f).sum(-1)  # [N]
        if correction is not None:
            log_c = correction.detach().to(log_w.dtype).clamp_min(0).log().clamp(low, high)  # [N, L], log 0 -> low
            log_w = log_w + (log_c * mask_f).sum(-1)  # [N]
        log_w = log_w.clamp(low, high)  # [N]
        positive = advantages.detach() >= 0  # [N]
        k_i = _by_sign(positive, k[0], k[1], log_w)  # [N]
        lam_i = _by_sign(positive, lam[0], lam[1], log_w)  # [N]
        log_phi = lam_i + k_i * log_w - lam_i * log_w.exp()  # [N]
        return log_phi.exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    ratio_level: str = "token",
    is_weights: Tensor | None = None,
    correction: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """VESPO: ``-sg(phi(w_i)) A log pi`` per token (the module docstring has the formula and the choices).

    Args are ``policy_loss``'s; ``k_*`` >= 0 and ``lambda_*`` > 0 shape phi for A >= 0 / A < 0 (the authors' and
    TRL's defaults 2, 3, 3, 2); ``correction``: the rollout correction's token weights ``[N, L]``, folded into w.
    Returns ``(token_loss [N, L], metrics)``: ``vespo_phi_mean`` / ``_min`` / ``_max`` and ``ratio_metrics``.
    """
    validate_vespo(k_pos, lambda_pos, k_neg, lambda_neg)
    on, mask_f, log_ratio, adv = _checked(logp, old_logp, advantages, mask, ratio_level, ("token",))
    if correction is not None:
        check_token_shapes({"logp": logp, "correction": correction})
    phi = vespo_weights(log_ratio, advantages, mask_f, (k_pos, k_neg), (lambda_pos, lambda_neg), correction)  # [N]
    loss = -phi.unsqueeze(-1) * adv * torch.where(on, logp, torch.zeros_like(logp))  # [N, L]
    loss = _finish(loss, on, is_weights)  # [N, L]
    with torch.no_grad():
        scored = on.any(-1)  # [N]
        metrics = {
            "vespo_phi_mean": masked_mean(phi.unsqueeze(-1).expand_as(mask_f), mask_f),
            "vespo_phi_min": torch.where(scored, phi, float("inf")).min(),
            "vespo_phi_max": torch.where(scored, phi, float("-inf")).max(),
        }
    return loss, {**metrics, **ratio_metrics(log_ratio, log_ratio.exp(), mask_f)}


@dataclass(frozen=True)
class SurrogateLoss:
    """An entry of ``SURROGATES``.

    Attributes:
        loss: ``fn(logp, old_logp, advantages, mask, *, ratio_level, is_weights, **options) -> (token_loss, metrics)``.
        ratio_levels: the ``ratio_level`` values it accepts.
        folds_correction: it takes the rollout correction's weights as ``correction`` into its own weight; the
            others have them multiplied into ``is_weights``.
    """

    loss: Callable[..., tuple[Tensor, Metrics]]
    ratio_levels: tuple[str, ...] = RATIO_LEVELS
    folds_correction: bool = False


SURROGATES: Registry[SurrogateLoss] = Registry("policy-loss surrogate")
SURROGATES.add("clip", SurrogateLoss(policy_loss))
SURROGATES.add("cispo", SurrogateLoss(cispo_loss, ratio_levels=("token",)))
SURROGATES.add("sapo", SurrogateLoss(sapo_loss))
SURROGATES.add("vespo", SurrogateLoss(vespo_loss, ratio_levels=("token",), folds_correction=True))
