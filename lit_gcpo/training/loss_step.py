"""The loss side of a training step: ``GRPOModule``'s loss settings and what a step computes with them.

A step over a ``RolloutBatch`` is planned once (``LossStep.plan``: the group advantages times the callback's
weights, the loss mask, the global token and sequence counts every micro-batch's loss is normalised by, and the
rollout-correction weights when the engine is another copy of the policy) and its loss is then computed per
micro-batch from the policy's log-probs (``LossStep.micro_batch_loss``, ``lit_gcpo.algorithms.losses.grpo_loss``).
With one optimizer step per rollout the generating policy's log-probs are the training pass's own (detached), also
for a batch another engine sampled (vLLM, or the stale copy of one-step-off-policy rollouts): the rollout-correction
weights are then computed per micro-batch from them (``DeferredCorrection``), and no scoring pass runs for them.
``model.token_selection`` enters both (``lit_gcpo.training.token_selection``): the high-entropy keep mask is part of
the plan, Clip-Cov's detach mask and KL-Cov's penalty are per micro-batch. ``model.surrogate`` chooses the per-token
policy loss (``lit_gcpo.algorithms.surrogates``): the correction's weights multiply it, or VESPO folds them into its
sequence weight, so the plan keeps them apart from the keep masks.
The module owns the forward pass, the backward pass and the optimizer; this file owns which loss they follow.
Everything read about the batch (how it was sampled, the engine's log-probs) is on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.losses import grpo_loss
from lit_gcpo.algorithms.rollout_correction import rollout_correction_weights
from lit_gcpo.algorithms.surrogate_options import Surrogate
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.training.token_selection import Gather, LossTokenSelection, combine_weights

# reduce(tensor, op) with op in {"sum", "min", "max"}: over data-parallel ranks (identity on one device)
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class StepPlan:
    """What every micro-batch and iteration of one step shares (rows: completions of the batch)."""

    advantages: torch.Tensor  # [N], times the callback's weights
    mask: torch.Tensor  # [N, L], truncated completions left out when asked
    correction: torch.Tensor | None  # [N, L]: the rollout-correction weights when a scoring pass gave them
    keep: torch.Tensor | None  # [N, L]: the token selection's keep mask for the whole step (high-entropy tokens)
    behaviour: torch.Tensor | None  # [N, L]: the engine's log-probs when it is another copy of the policy
    counts: tuple[torch.Tensor, torch.Tensor]  # global (all ranks) tokens and sequences, at least 1 each
    with_entropy: bool
    reduce: Reduce  # over data-parallel ranks (the covariance means of Clip-Cov / KL-Cov)
    generator: torch.Generator | None = None  # Clip-Cov's random choice, seeded per optimizer step
    deferred: DeferredCorrection | None = None  # the rollout correction, from the training pass's log-probs


@dataclass
class DeferredCorrection:
    """The rollout correction of a step without old log-probs on the batch (one iteration: no scoring pass ran for
    them). Each micro-batch's weights come from its training pass's detached log-probs, which ``parts`` collects;
    after the last micro-batch the correction's metrics over the whole batch (the values the scoring-pass path
    computes in ``LossStep.plan``) are written into ``metrics``, the dict ``plan`` returned for the step's log."""

    metrics: dict[str, Any]
    parts: list[torch.Tensor] = field(default_factory=list)  # [n, L] each, in row order


@dataclass(frozen=True)
class LossStep:
    """The loss settings of ``GRPOModule`` (its arguments of the same names, documented there)."""

    advantage: str
    advantage_scale: str
    loss_aggregation: str
    eps_low: float
    eps_high: float
    dual_clip: float | None
    ratio_level: str
    rollout_correction: str | None
    rollout_correction_min: float | None
    rollout_correction_max: float | None
    off_policy_mask_threshold: float | None
    beta: float
    kl_estimator: str
    entropy_coef: float
    num_iterations: int
    mask_truncated_completions: bool
    surrogate: Surrogate | None = None
    selection: LossTokenSelection = field(default_factory=lambda: LossTokenSelection(None))

    @classmethod
    def from_hparams(
        cls,
        hparams: Mapping[str, Any],
        selection: LossTokenSelection | None = None,
        surrogate: Surrogate | None = None,
    ) -> LossStep:
        """The settings of ``hparams``; ``selection`` and ``surrogate``: ``model.token_selection`` and
        ``model.surrogate`` as objects (under LightningCLI ``hparams`` hold their configs)."""
        settings = {f.name: hparams[f.name] for f in fields(cls) if f.name not in ("selection", "surrogate")}
        return cls(**settings, surrogate=surrogate, selection=selection or LossTokenSelection(None))

    def engine_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The engine's log-probs when the engine is another copy of the policy (vLLM), else None."""
        return batch.engine_logprobs if batch.engine_logprobs is not None and not batch.samples_from_policy else None

    def importance_corrected(self, batch: RolloutBatch) -> bool:
        """Whether the loss weighs tokens by the importance ratio of trainer to engine log-probs."""
        return self.rollout_correction is not None and self.engine_logprobs(batch) is not None

    def needs_old_logprobs(self, batch: RolloutBatch) -> bool:
        """Whether the loss needs the generating policy's log-probs before training: several optimizer steps per
        rollout (the policy moves between them). With one they are the training pass's own (detached), also for
        the importance correction of another engine (``DeferredCorrection``): the same values as a no-grad pass
        over the same micro-batches under the same precision, so ``batch`` does not matter here."""
        return self.num_iterations > 1

    def correction_weights(
        self, trainer_logprobs: torch.Tensor, batch: RolloutBatch, rows: slice, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``rollout_correction_weights`` of the trainer's log-probs ``[n, L]`` of ``rows`` against the engine's."""
        return rollout_correction_weights(
            trainer_logprobs,
            batch.engine_logprobs[rows],
            mask[rows],
            self.rollout_correction,
            self.rollout_correction_min,
            self.rollout_correction_max,
        )

    def advantages_and_mask(
        self, batch: RolloutBatch, reduce: Reduce
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The group advantages ``[N]`` (times the callback's weights), the loss mask ``[N, L]`` (truncated
        completions left out when asked) and the advantages' metrics."""
        advantages, metrics = group_advantages(
            batch.rewards,
            batch.group_ids,
            batch.num_groups,
            mode=self.advantage,
            scale=self.advantage_scale,
            all_reduce_sum=lambda t: reduce(t, "sum"),
        )  # [N]
        if batch.advantage_weights is not None:
            advantages = advantages * batch.advantage_weights.to(advantages.dtype)  # [N], constant within a group
        mask = batch.completion_mask  # [N, L]
        if self.mask_truncated_completions and batch.truncated is not None:
            mask = mask * (~batch.truncated.bool()).unsqueeze(-1).to(mask.dtype)  # [N, L]
        return advantages, mask, metrics

    def plan(
        self,
        batch: RolloutBatch,
        reduce: Reduce,
        logs_this_step: bool,
        gather: Gather = lambda values: values,
        step: int = 0,
    ) -> tuple[StepPlan, dict[str, Any]]:
        """The step's shared inputs, and the metrics of its advantages, rollout correction and token selection;
        ``gather`` concatenates a tensor of every rank (the entropy quantile), ``step`` seeds Clip-Cov."""
        advantages, mask, adv_metrics = self.advantages_and_mask(batch, reduce)  # [N], [N, L]
        if batch.old_logprobs is None and self.needs_old_logprobs(batch):
            raise ValueError(
                "this batch has no old_logprobs, which the loss needs (num_iterations > 1): call score_rollout on it "
                "first (the RolloutDataModule does)"
            )
        # Global counts, so that micro-batches and ranks add up to the whole batch's loss.
        counts = reduce(torch.stack([mask.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)]), "sum")
        num_tokens, num_seqs = counts.clamp(min=1).unbind()  # no tokens (all masked): a zero loss, not 0/0
        correction, tis_metrics = None, {}
        corrected = self.importance_corrected(batch)
        if corrected and batch.old_logprobs is not None:  # a scoring pass ran (asked for, or several iterations)
            correction, tis_metrics = self.correction_weights(batch.old_logprobs, batch, slice(None), mask)
        keep, selection_metrics = self.selection.step_mask(batch, mask, gather)  # [N, L] or None
        metrics = {**adv_metrics, **tis_metrics, **selection_metrics}
        plan = StepPlan(
            advantages=advantages,
            mask=mask,
            correction=correction,
            keep=keep,
            # the off-policy mask compares with what sampled the tokens: the engine, else the old log-probs (TRL's)
            behaviour=self.engine_logprobs(batch),
            counts=(num_tokens, num_seqs),
            # entropy is only logged (unless it is in the loss): computed on the steps that write logs
            with_entropy=self.entropy_coef != 0 or logs_this_step,
            reduce=reduce,
            generator=self.selection.generator(step, mask.device),
            deferred=DeferredCorrection(metrics) if corrected and batch.old_logprobs is None else None,
        )
        return plan, metrics

    def micro_batch_loss(
        self,
        batch: RolloutBatch,
        rows: slice,
        logprobs: torch.Tensor,
        entropy: torch.Tensor | None,
        plan: StepPlan,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """This micro-batch's share of the batch's loss (normalised by the plan's global counts of tokens and
        sequences) from the policy's ``logprobs`` ``[n, L]`` of its ``rows``, and its metrics."""
        # one step per rollout: the trainer's log-probs of the generating step are this very forward's
        old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[rows]
        correction = None if plan.correction is None else plan.correction[rows]
        if plan.deferred is not None:  # then plan.correction is None
            correction = self._deferred_weights(batch, rows, old, plan)
        step_keep = None if plan.keep is None else plan.keep[rows]
        eps_low, eps_high = self.selection.surrogate_clip(self.eps_low, self.eps_high)
        keep, penalty, selection_metrics = self.selection.micro_batch(
            logprobs, old, plan.advantages[rows], plan.mask[rows], eps_low=eps_low, eps_high=eps_high,
            generator=plan.generator, reduce=lambda value: plan.reduce(value, "sum"),
        )  # fmt: skip
        loss, metrics = grpo_loss(
            logprobs,
            old,
            plan.advantages[rows],
            plan.mask[rows],
            ref_logp=None if batch.ref_logprobs is None else batch.ref_logprobs[rows],
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            surrogate="clip" if self.surrogate is None else self.surrogate.name,
            surrogate_options=None if self.surrogate is None else self.surrogate.options(),
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=self.dual_clip,
            ratio_level=self.ratio_level,
            is_weights=combine_weights(step_keep, keep),
            correction=correction,
            token_penalty=penalty,
            off_policy_threshold=self.off_policy_mask_threshold,
            behaviour_logp=None if plan.behaviour is None else plan.behaviour[rows],
            aggregation=self.loss_aggregation,
            num_tokens=plan.counts[0],
            num_seqs=plan.counts[1],
            max_len=batch.max_new_tokens,
        )
        if "entropy_mean" in metrics:  # grpo_loss's masked mean of `entropy`
            metrics["entropy"] = metrics.pop("entropy_mean")
        return loss, {**metrics, **selection_metrics}

    def _deferred_weights(self, batch: RolloutBatch, rows: slice, old: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The rollout-correction weights ``[n, L]`` of ``rows`` from the training pass's log-probs ``old`` (row-wise,
        so equal to the rows of the whole batch's); after the last micro-batch, the step's metrics over all rows."""
        deferred = plan.deferred
        weights, _ = self.correction_weights(old, batch, rows, plan.mask)
        deferred.parts.append(old)
        if sum(part.shape[0] for part in deferred.parts) == plan.mask.shape[0]:
            _, metrics = self.correction_weights(torch.cat(deferred.parts), batch, slice(None), plan.mask)
            deferred.metrics.update(metrics)
        return weights
