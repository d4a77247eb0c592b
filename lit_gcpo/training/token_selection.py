"""``model.token_selection`` in a training step: which tokens carry the policy gradient, and which get a penalty.

The math is ``lit_gcpo.algorithms.token_selection`` (pure functions); this adapter decides when each runs and with
what, so that ``GRPOModule`` only calls three methods:

- ``high_entropy_tokens``: the keep mask is computed once per step, before the micro-batches, from the batch's
  ``token_entropy`` (the trainer's policy at the loss temperature, filled by the scoring pass: ``fields`` asks for
  it), with the quantile over every completion token of every rank. TRL 1.16 takes the quantile of the entropies
  of each of its loss passes (a micro-batch, gathered over ranks) from the current policy. Project's reading: the
  whole step's tokens, from the policy that sampled them, so that the mask does not depend on the micro-batch size
  (METHODS.md section 2) and stays the same over the ``num_iterations`` steps of one rollout; on the first
  iteration the two policies are the same one. The mask multiplies the policy-gradient token loss only (TRL's
  ``entropy_mask``), the normaliser keeps every token.
- ``clip_cov`` / ``kl_cov``: per micro-batch (verl's unit), from the current log-probs, with the covariance means
  over that micro-batch of every rank (``reduce``). Clip-Cov's random choice is drawn from a generator seeded with
  the option's ``seed`` and the optimizer step, so a step is reproducible and a resumed run draws what it would
  have. KL-Cov's surrogate is unclipped (the paper and verl): ``surrogate_clip`` sets eps_low = eps_high = inf, so
  ``model.eps_low`` / ``eps_high`` do not act under ``kl_cov``.

Metrics (``train/...``): ``entropy_threshold`` and ``high_entropy_frac``; ``clip_cov_frac``,
``clip_cov_eligible_frac`` and ``cov_mean``; ``kl_cov_frac`` and ``kl_cov_abs_kl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_gcpo.algorithms.token_selection import (
    KL_COV_SURROGATE_CLIP,
    ClipCov,
    Gather,
    HighEntropyTokens,
    KLCov,
    TokenSelection,
    clip_cov_mask,
    high_entropy_mask,
    kl_cov_penalty,
)

Reduce = Callable[[Tensor], Tensor]

GENERATOR_STEP_STRIDE = 1_000_003
"""Clip-Cov's generator seed is ``seed * GENERATOR_STEP_STRIDE + step``: distinct for every (seed, step) pair below
a million steps."""


class LossTokenSelection:
    """Applies one ``TokenSelection`` (or none) in ``GRPOModule``'s training step.

    Args:
        options: the method and its options; None: every token, no penalty.
    """

    def __init__(self, options: TokenSelection | None) -> None:
        if options is not None and not isinstance(options, TokenSelection):
            raise TypeError(f"model.token_selection must be a TokenSelection (or None), got {type(options).__name__}")
        self.options = options

    @property
    def fields(self) -> set[str]:
        """The optional batch fields the loss reads (``lit_gcpo.data.batch.OPTIONAL_FIELDS``)."""
        return {"token_entropy"} if isinstance(self.options, HighEntropyTokens) else set()

    def surrogate_clip(self, eps_low: float, eps_high: float) -> tuple[float, float]:
        """The clip range of the policy loss: KL-Cov's unclipped surrogate, else the module's."""
        if isinstance(self.options, KLCov):
            return KL_COV_SURROGATE_CLIP, KL_COV_SURROGATE_CLIP
        return eps_low, eps_high

    def step_mask(self, batch: Any, mask: Tensor, gather: Gather) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``high_entropy_tokens``' keep mask ``[N, L]`` (float) for the whole step and its metrics; None otherwise."""
        if not isinstance(self.options, HighEntropyTokens):
            return None, {}
        if batch.token_entropy is None:
            raise ValueError(
                "high_entropy_tokens needs batch.token_entropy [N, L]: call score_rollout on the batch first (the "
                "RolloutDataModule does)"
            )
        keep, metrics = high_entropy_mask(batch.token_entropy, mask, self.options.rho, gather=gather)  # [N, L]
        return keep.to(mask.dtype), metrics

    def generator(self, step: int, device: torch.device) -> torch.Generator | None:
        """Clip-Cov's generator for optimizer step ``step`` (None for the other methods)."""
        if not isinstance(self.options, ClipCov):
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.options.seed * GENERATOR_STEP_STRIDE + step)
        return generator

    def micro_batch(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        eps_low: float,
        eps_high: float,
        generator: torch.Generator | None,
        reduce: Reduce,
    ) -> tuple[Tensor | None, Tensor | None, dict[str, Tensor]]:
        """``(keep [n, L] or None, penalty [n, L] or None, metrics)`` of one micro-batch: Clip-Cov's detach mask or
        KL-Cov's penalty (with gradient through ``logp``)."""
        options = self.options
        if isinstance(options, ClipCov):
            if generator is None:
                raise ValueError("clip_cov needs the step's generator (LossTokenSelection.generator)")
            keep, metrics = clip_cov_mask(
                logp,
                old_logp,
                advantages,
                mask,
                generator=generator,
                ratio=options.ratio,
                lb=options.lb,
                ub=options.ub,
                eps_low=eps_low,
                eps_high=eps_high,
                reduce=reduce,
            )  # [n, L]
            return keep, None, metrics
        if isinstance(options, KLCov):
            penalty, metrics = kl_cov_penalty(
                logp, old_logp, advantages, mask, ratio=options.ratio, coef=options.coef, reduce=reduce
            )  # [n, L]
            return None, penalty, metrics
        return None, None, {}


def combine_weights(*weights: Tensor | None) -> Tensor | None:
    """The product of the per-token weights that are given (None when none is)."""
    given = [weight for weight in weights if weight is not None]
    return math.prod(given[1:], start=given[0]) if given else None


def rank_gather(trainer: Any) -> Gather:
    """Concatenates a 1-D tensor of every data-parallel rank in rank order (lengths may differ); the identity on
    one process. A collective: every rank must call it."""
    if trainer is None or trainer.world_size == 1:
        return lambda values: values

    def gather(values: Tensor) -> Tensor:
        sizes = trainer.strategy.all_gather(torch.tensor([values.numel()], device=values.device)).flatten().tolist()
        padded = values.new_zeros(int(max(sizes)))  # [max]
        padded[: values.numel()] = values
        stacked = trainer.strategy.all_gather(padded)  # [world, max]
        return torch.cat([stacked[rank, : int(size)] for rank, size in enumerate(sizes)])

    return gather
