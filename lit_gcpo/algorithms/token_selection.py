"""Token selection for the policy loss: which tokens carry the gradient, and which get a penalty (METHODS.md §7).

Three methods choose tokens from the batch and change only their loss; each is a pure function returning a
token tensor that composes with ``lit_gcpo.algorithms.losses.policy_loss`` / ``grpo_loss`` (one concern: selecting
tokens, hence one module):

- ``high_entropy_tokens`` (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939; TRL 1.16's
  ``GRPOConfig.top_entropy_quantile``): the policy-gradient loss is kept only on the tokens whose entropy is
  at least the (1 - rho) quantile of the batch's completion-token entropies. Semantics of TRL exactly: the
  quantile is ``torch.quantile``'s linear interpolation over the entropies of every mask token of every rank
  (gathered), in float32; a token is kept when its entropy >= that threshold (ties kept) and it is a mask
  token; an empty batch keeps nothing; rho = 1 keeps every token. TRL multiplies the mask into the
  policy-gradient token loss only (not the KL term) and keeps the loss's normaliser (all mask tokens):
  ``token_loss = policy_loss(...)[0] * keep`` does the same here.
- ``clip_cov`` (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, "Clip-Cov";
  verl ``compute_policy_loss_clip_cov``): per-token Cov_t = (A_t - mean A) (log pi_t - mean log pi)
  with the means over the batch's mask tokens; among the tokens with lb < Cov_t < ub that PPO's clip does not
  already hold (verl's ``clip_by_origin``: the clipped surrogate strictly above the unclipped one), choose
  max(1, int(ratio * n_tokens)) at random and detach them (their token loss times 0, the normaliser
  unchanged, as verl does). The paper does not mention the PPO-clipped exclusion; verl's does, and so does
  this. The random choice uses a caller's seeded ``torch.Generator`` (a uniform permutation of the eligible
  tokens in row-major order, the first ones chosen), so a step is reproducible.
- ``kl_cov`` (same paper, "KL-Cov"; verl ``compute_policy_loss_kl_cov``): the max(1, int(ratio * n_tokens))
  tokens of largest Cov_t get the penalty coef * |log pi_t - log pi_old,t| added to their token loss (with
  gradient). In verl and in the paper the surrogate of KL-Cov is the *unclipped* -A rho: compose with
  ``policy_loss(..., eps_low=math.inf, eps_high=math.inf)`` to match them (``KL_COV_SURROGATE_CLIP``).

Data parallelism (project's reading). verl computes everything per micro-batch on each rank, TRL gathers the
entropies of every rank for the quantile. Here the batch-wide statistics are global: the quantile through
``gather`` (concatenates every rank's 1-D tensor; the identity on one process) and the covariance means through
``reduce`` (sums over ranks, as in ``lit_gcpo.algorithms.weighting``). The number of tokens chosen by Clip-Cov / KL-Cov
stays per call, ``int(ratio * this call's mask tokens)``, among this call's tokens, as verl does per rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lit_gcpo.algorithms.registry import Registry
from lit_gcpo.algorithms.weighting import Reduce, no_reduce
from lit_gcpo.moved import allow_unpickling

Metrics = dict[str, Tensor]
Gather = Callable[[Tensor], Tensor]
"""Concatenates a 1-D tensor of every data-parallel rank (lengths may differ); the identity on one process."""

KL_COV_SURROGATE_CLIP = math.inf
"""The ``eps_low`` / ``eps_high`` of ``policy_loss`` that give KL-Cov's unclipped surrogate (paper and verl)."""

QUANTILE_MAX_ELEMENTS = 2**24
"""``torch.quantile`` refuses larger inputs; beyond it the same linear interpolation runs on a sort."""


def no_gather(values: Tensor) -> Tensor:
    """The ``gather`` of a single process."""
    return values


def validate_rho(rho: float) -> None:
    """``rho`` is the kept share of tokens, in (0, 1]."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"high_entropy_tokens needs rho (top_entropy_quantile) in (0, 1], got {rho}")


def _linear_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation, q cast to the values' dtype), for any length."""
    if values.numel() <= QUANTILE_MAX_ELEMENTS:
        return torch.quantile(values, q)
    ordered, _ = torch.sort(values)  # [M]
    rank = torch.tensor(q, dtype=values.dtype, device=values.device) * (values.numel() - 1)
    below, above = rank.floor().long(), rank.ceil().long()
    return torch.lerp(ordered[below], ordered[above], rank - below.to(values.dtype))


def high_entropy_mask(
    entropy: Tensor, mask: Tensor, rho: float = 0.2, *, gather: Gather = no_gather
) -> tuple[Tensor, Metrics]:
    """Keep the policy gradient on the top-``rho`` share of the batch's tokens by entropy (TRL semantics).

    Args:
        entropy: ``[N, L]`` token entropies of the policy at the loss temperature.
        mask: ``[N, L]`` 1 on completion tokens.
        rho: the share kept, in (0, 1] (TRL's ``top_entropy_quantile``, the paper's 0.2).
        gather: concatenates every rank's 1-D tensor (see the module docstring).

    Returns ``(keep [N, L] bool, metrics)``: ``entropy_threshold`` (0 for an empty batch) and
    ``high_entropy_frac`` (kept share of this call's mask tokens).
    """
    validate_rho(rho)
    if entropy.shape != mask.shape or entropy.ndim != 2:
        raise ValueError(
            f"entropy and mask must share one [N, L] shape, got {tuple(entropy.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        on = mask > 0  # [N, L]
        values = gather(entropy.detach()[on].float())  # [M] every rank's mask-token entropies
        if values.numel() == 0:
            keep = torch.zeros_like(on)
            threshold = entropy.new_zeros((), dtype=torch.float32)
        else:
            threshold = _linear_quantile(values, 1.0 - rho)
            keep = (entropy.detach().float() >= threshold) & on  # [N, L]
        kept = keep.sum().float() / on.sum().clamp(min=1).float()
    return keep, {"entropy_threshold": threshold, "high_entropy_frac": kept}


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor, reduce: Reduce = no_reduce) -> Tensor:
    """Cov_t = (A_t - mean A) (log pi_t - mean log pi) per token ``[N, L]`` (detached, 0 on padding).

    The means are over the mask tokens of all ranks (``reduce`` sums), token-weighted as in verl. ``logp`` is
    the current policy's log-prob of the sampled token ``[N, L]``, ``advantages`` one per completion ``[N]``.
    """
    if logp.shape != mask.shape or logp.ndim != 2:
        raise ValueError(f"logp and mask must share one [N, L] shape, got {tuple(logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    with torch.no_grad():
        on = mask > 0  # [N, L]
        lp = torch.where(on, logp.detach().double(), 0.0)  # [N, L]
        adv = advantages.detach().double().unsqueeze(-1).expand_as(lp)  # [N, L]
        sums = reduce(torch.stack([torch.where(on, adv, 0.0).sum(), lp.sum(), on.sum().double()]))  # [3]
        count = sums[2].clamp(min=1.0)
        cov = (adv - sums[0] / count) * (lp - sums[1] / count)  # [N, L]
        return torch.where(on, cov, 0.0)


def _selection_size(ratio: float, mask: Tensor) -> int:
    # verl: max(int(ratio * number of mask tokens), 1), with this call's tokens.
    return max(int(ratio * int((mask > 0).sum())), 1)


def validate_clip_cov(ratio: float, lb: float, ub: float) -> None:
    """Clip-Cov needs 0 < ratio <= 1 and a non-empty band lb < ub."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clip_cov's ratio (share of tokens detached) must be in (0, 1], got {ratio}")
    if not lb < ub:
        raise ValueError(f"clip_cov needs lb < ub (the covariance band), got lb={lb} >= ub={ub}")


def clip_cov_mask(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    generator: torch.Generator,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reduce: Reduce = no_reduce,
) -> tuple[Tensor, Metrics]:
    """Clip-Cov: detach a random ``ratio`` of the tokens with covariance in (lb, ub) not clipped by PPO.

    Args:
        logp, old_logp, advantages, mask: as in ``losses.policy_loss`` (``[N, L]``, ``[N, L]``, ``[N]``, ``[N, L]``).
        generator: seeded generator of the random choice (on the tensors' device).
        ratio: share of this call's mask tokens to detach (verl's ``clip_cov_ratio``, 2e-4).
        lb, ub: the open covariance band (verl's ``clip_cov_lb`` 1, ``clip_cov_ub`` 5).
        eps_low, eps_high: the PPO clip range of the loss, to leave out the tokens it already clips.
        reduce: sums over data-parallel ranks (covariance means).

    Returns ``(keep [N, L] float, metrics)``: 0 on the detached tokens, 1 elsewhere; multiply it into the token
    loss. Metrics: ``clip_cov_frac`` (detached share of mask tokens, verl's ``pg_clipfrac``),
    ``clip_cov_eligible_frac`` and ``cov_mean``.
    """
    validate_clip_cov(ratio, lb, ub)
    cov = token_covariance(logp, advantages, mask, reduce)  # [N, L]
    with torch.no_grad():
        on = mask > 0  # [N, L]
        adv = advantages.detach().to(logp.dtype).unsqueeze(-1)  # [N, 1]
        token_ratio = torch.where(on, logp.detach() - old_logp.detach(), 0.0).exp()  # [N, L]
        clipped = -adv * token_ratio.clamp(1.0 - eps_low, 1.0 + eps_high) > -adv * token_ratio  # [N, L]
        eligible = on & ~clipped & (cov > lb) & (cov < ub)  # [N, L]
        candidates = eligible.flatten().nonzero().squeeze(-1)  # [E] row-major
        order = torch.randperm(candidates.numel(), generator=generator, device=generator.device)
        chosen = candidates[order[: _selection_size(ratio, mask)].to(candidates.device)]
        keep = torch.ones(on.numel(), dtype=logp.dtype, device=logp.device)
        keep[chosen] = 0.0
        keep = keep.view_as(logp)  # [N, L]
        tokens = on.sum().clamp(min=1).float()
        metrics = {
            "clip_cov_frac": chosen.numel() / tokens,
            "clip_cov_eligible_frac": eligible.sum().float() / tokens,
            "cov_mean": cov.sum().float() / tokens,
        }
    return keep, metrics


def validate_kl_cov(ratio: float, coef: float) -> None:
    """KL-Cov needs 0 < ratio <= 1 and coef >= 0."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"kl_cov's ratio (share of tokens penalised) must be in (0, 1], got {ratio}")
    if not coef >= 0.0:
        raise ValueError(f"kl_cov's coef (ppo_kl_coef) must be >= 0, got {coef}")


def kl_cov_penalty(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ratio: float = 2e-4,
    coef: float = 1.0,
    reduce: Reduce = no_reduce,
) -> tuple[Tensor, Metrics]:
    """KL-Cov: coef * |log pi - log pi_old| on the ``ratio`` share of tokens with the largest covariance.

    Args:
        logp: ``[N, L]`` current log-probs (the penalty's gradient flows through them).
        old_logp, advantages, mask: as in ``losses.policy_loss``.
        ratio: share of this call's mask tokens penalised (verl's ``kl_cov_ratio``, 2e-4).
        coef: the penalty coefficient (verl's ``ppo_kl_coef``, 1).
        reduce: sums over data-parallel ranks (covariance means).

    Returns ``(penalty [N, L], metrics)``: 0 off the chosen tokens; add it to the token loss before aggregation.
    Metrics: ``kl_cov_frac`` (penalised share of mask tokens) and ``kl_cov_abs_kl`` (mean |log pi - log pi_old|
    over mask tokens, verl's ``ppo_kl`` for KL-Cov).
    """
    validate_kl_cov(ratio, coef)
    cov = token_covariance(logp, advantages, mask, reduce)  # [N, L]
    on = mask > 0  # [N, L]
    with torch.no_grad():
        valid = on.flatten().nonzero().squeeze(-1)  # [M] row-major
        k = min(_selection_size(ratio, mask), valid.numel())
        top = torch.topk(cov.flatten()[valid], k).indices if k else valid[:0]  # [k]
        chosen = torch.zeros(on.numel(), dtype=torch.bool, device=on.device)
        chosen[valid[top]] = True
        chosen = chosen.view_as(on)  # [N, L]
    abs_kl = torch.where(on, logp - old_logp.detach(), torch.zeros_like(logp)).abs()  # [N, L]
    penalty = torch.where(chosen, coef * abs_kl, torch.zeros_like(abs_kl))  # [N, L]
    with torch.no_grad():
        tokens = on.sum().clamp(min=1).float()
        metrics = {
            "kl_cov_frac": chosen.sum().float() / tokens,
            "kl_cov_abs_kl": abs_kl.detach().sum().float() / tokens,
        }
    return penalty, metrics


@dataclass(frozen=True)
class TokenSelection:
    """A token-selection method of the policy loss (``model.token_selection``): one of the subclasses below, each
    named in ``TOKEN_SELECTIONS`` and validated on construction (so at parse time from a config)."""

    name: ClassVar[str] = ""


@dataclass(frozen=True)
class HighEntropyTokens(TokenSelection):
    """``high_entropy_tokens``: the policy gradient on the top-``rho`` tokens by entropy.

    Args:
        rho: kept share of tokens, in (0, 1] (TRL's ``top_entropy_quantile``; the paper's 0.2).
    """

    name: ClassVar[str] = "high_entropy_tokens"
    rho: float = 0.2

    def __post_init__(self) -> None:
        validate_rho(self.rho)


@dataclass(frozen=True)
class ClipCov(TokenSelection):
    """``clip_cov``: detach a random share of the tokens with covariance in (lb, ub).

    Args:
        ratio: share of tokens detached (verl's ``clip_cov_ratio``).
        lb: lower bound of the covariance band.
        ub: upper bound of the covariance band.
        seed: seed of the random choice (the caller seeds a ``torch.Generator`` with it and the step number).
    """

    name: ClassVar[str] = "clip_cov"
    ratio: float = 2e-4
    lb: float = 1.0
    ub: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        validate_clip_cov(self.ratio, self.lb, self.ub)


@dataclass(frozen=True)
class KLCov(TokenSelection):
    """``kl_cov``: a |log-ratio| penalty on the top share of tokens by covariance, unclipped surrogate.

    Args:
        ratio: share of tokens penalised (verl's ``kl_cov_ratio``).
        coef: the penalty coefficient (verl's ``ppo_kl_coef``).
    """

    name: ClassVar[str] = "kl_cov"
    ratio: float = 2e-4
    coef: float = 1.0

    def __post_init__(self) -> None:
        validate_kl_cov(self.ratio, self.coef)


TOKEN_SELECTIONS: Registry[type[TokenSelection]] = Registry("token selection")
"""Method name -> its options dataclass (validated on construction, i.e. at parse time)."""
for _selection in (HighEntropyTokens, ClipCov, KLCov):
    TOKEN_SELECTIONS.add(_selection.name, _selection)
    allow_unpickling(_selection)  # a module built in Python holds the object in its hyper-parameters
