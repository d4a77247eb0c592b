"""The no-grad passes that fill a fresh rollout's model-dependent fields (``GRPOModule.score_rollout``).

A ``RolloutBatch`` leaves the collector with tokens, rewards and (depending on the engine) the engine's own
log-probs and embeddings. What the loss or a callback still needs from the models is filled here: the
generating policy's log-probs ``old_logprobs``, the mean-pooled last hidden state of each completion
(``embeddings``), the summaries of the policy's distribution at each completion token (``token_entropy``,
``token_mean_logprob``: always the trainer's policy, whatever the engine) and the reference log-probs
``ref_logprobs``. Only what is read is computed. With one optimizer step per rollout the old log-probs are the
training pass's own, whichever engine sampled the batch (another copy of the policy too: the loss then computes the
rollout correction per micro-batch from them, ``lit_gcpo.training.loss_step.DeferredCorrection``), so without a
callback that asks for embeddings or sequence log-probs there is no policy pass at all. What still runs one:
``num_iterations`` > 1 (the old log-probs must precede the first optimizer step), embeddings under the current
weights (GCPO's geometry, embedding clustering) and the token summaries (token selection, label-free rewards), both
of which give the old log-probs from the same forward, and a callback that reads ``old_logprobs``; the reference
model (beta > 0) is a pass of its own model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from lit_gcpo.data.batch import OPTIONAL_FIELDS, RolloutBatch
from lit_gcpo.training.scoring import ScoredTokens

# forward(input_ids, attention_mask, completion_length, *, temperature, with_hidden, with_distribution, reference)
#   -> ScoredTokens: GRPOModule.completion_scores
Forward = Callable[..., ScoredTokens]
DISTRIBUTION_FIELDS = {"token_entropy", "token_mean_logprob"}


@dataclass(frozen=True)
class ScoringPasses:
    """Which passes a rollout needs: the policy's (log-probs, and hidden states for embeddings, and the token
    distribution's summaries), the reference's."""

    policy: bool
    hidden: bool
    reference: bool
    distribution: bool = False

    @classmethod
    def needed(
        cls,
        batch: RolloutBatch,
        fields: Collection[str] | None,
        loss_needs_old: bool,
        with_reference_model: bool,
        loss_fields: Collection[str] = (),
    ) -> ScoringPasses:
        """``fields``: the optional fields the callbacks read (None: all); ``loss_needs_old``: the loss needs the
        generating policy's log-probs before training; ``with_reference_model``: a training batch with beta > 0;
        ``loss_fields``: the optional fields the loss itself reads (a training batch)."""
        wanted = set(OPTIONAL_FIELDS if fields is None else fields) | set(loss_fields)
        # embeddings and sequence log-probs the engine already reported need no pass of their own
        hidden = "embeddings" in wanted and batch.embeddings is None
        distribution = bool(wanted & DISTRIBUTION_FIELDS)
        policy = (
            hidden
            or distribution
            or "old_logprobs" in wanted
            or ("seq_logprobs" in wanted and batch.engine_logprobs is None)
            or loss_needs_old
        )
        return cls(policy=policy, hidden=hidden, reference=with_reference_model, distribution=distribution)


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` ``[n, L, H]`` over the completion tokens of ``mask`` ``[n, L]``: ``[n, H]`` float32."""
    return (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def fill_rollout_scores(batch: RolloutBatch, passes: ScoringPasses, micro: list[slice], forward: Forward) -> None:
    """Run ``passes`` over the ``micro`` batches of ``batch`` (the caller holds the precision context) and set
    ``old_logprobs``, ``embeddings`` (when a hidden pass ran; else kept), the token summaries (when asked) and
    ``ref_logprobs`` (None when not run)."""
    old, ref, embeddings, scored_parts = [], [], [], []
    length, temperature = batch.completion_mask.shape[1], batch.logprob_temperature
    for rows in micro if passes.policy or passes.reference else []:
        ids, attn, mask = batch.input_ids[rows], batch.attention_mask[rows], batch.completion_mask[rows]
        if passes.policy:
            extra = {"with_distribution": True} if passes.distribution else {}  # asked for only when wanted
            scored = forward(ids, attn, length, temperature=temperature, with_hidden=passes.hidden, **extra)
            old.append(scored.logprobs)
            scored_parts.append(scored)
            if scored.hidden is not None:  # one vector per completion
                embeddings.append(mean_pooled(scored.hidden, mask))  # [n, H]
        if passes.reference:
            ref.append(forward(ids, attn, length, temperature=temperature, reference=True).logprobs)
    batch.old_logprobs = torch.cat(old) if old else None  # [N, L]
    batch.embeddings = torch.cat(embeddings) if embeddings else batch.embeddings
    batch.ref_logprobs = torch.cat(ref) if ref else None
    if passes.distribution:
        fill_token_distribution(batch, scored_parts)


def fill_token_distribution(batch: RolloutBatch, parts: list[ScoredTokens]) -> None:
    """Write the summaries of the scored micro-batches ``parts`` (in row order) into ``batch``: ``token_entropy``
    and ``token_mean_logprob`` ``[N, L]``, and ``vocab_size``."""
    if not parts or any(part.distribution is None for part in parts):
        raise ValueError("fill_token_distribution needs parts scored with_distribution=True")
    batch.token_entropy = torch.cat([part.distribution.entropy for part in parts])  # [N, L]
    batch.token_mean_logprob = torch.cat([part.distribution.mean_logprob for part in parts])  # [N, L]
    batch.vocab_size = parts[0].vocab_size
