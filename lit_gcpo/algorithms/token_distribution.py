"""Per-token summaries of the policy's full next-token distribution, one chunk of logits at a time.

Token-distribution methods need more than the sampled token's log-prob: RENT (arXiv 2505.22660) rewards low
token entropy, Intuitor (arXiv 2505.19590) rewards the self-certainty KL(U || p_t), and the high-entropy-token
mask ("Beyond the 80/20 rule", arXiv 2506.01939) selects tokens by entropy. All three are functions of three
numbers per token, so the memory-bounded log-prob pass (``lit_gcpo.algorithms.logprobs``) can compute them chunk by
chunk and drop the ``[chunk, V]`` logits, never holding an ``[N, T, V]`` tensor:

- ``lse = logsumexp_v z_v`` with ``z = logits / T`` (T the temperature the loss uses);
- ``entropy = H(p_t) = lse - sum_v p_v z_v``;
- ``mean_logprob = (1/V) sum_v log p_v = mean_v z_v - lse``, from which
  ``KL(U || p_t) = -log V - mean_logprob`` (``lit_gcpo.algorithms.label_free.self_certainty_rewards``).

Project's reading: the summaries are of the temperature-scaled distribution the rollout sampled from (before
top-k / top-p truncation), as the log-probs of ``lit_gcpo.algorithms.logprobs`` are. Intuitor's released code computes
self-certainty on the raw logits (T = 1); at T = 1 the two agree. Everything runs without gradient, in float32
(float64 for float64 logits), like the log-prob path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenDistributionStats(NamedTuple):
    """Three ``[n]`` summaries of each token's temperature-scaled distribution over the vocabulary."""

    lse: Tensor
    entropy: Tensor
    mean_logprob: Tensor


def token_distribution_stats(logits: Tensor, temperature: float = 1.0) -> TokenDistributionStats:
    """``(lse, entropy, mean_logprob)`` of ``softmax(logits / temperature)`` for a chunk of tokens.

    Args:
        logits: one chunk of the policy's logits, ``[n, V]``, any float dtype (bf16 is upcast here, per chunk).
        temperature: T > 0, the temperature of the loss (and of the rollout).

    Returns:
        ``TokenDistributionStats`` of three ``[n]`` tensors in float32 (float64 for float64 logits), detached.
        Extra memory: two ``[n, V]`` buffers in that dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be one chunk [n, V], got shape {tuple(logits.shape)}")
    with torch.no_grad():
        z = logits.detach().to(torch.promote_types(logits.dtype, torch.float32), copy=True)  # [n, V]
        if temperature != 1.0:
            z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1)  # [n]
        mean_logprob = z.mean(dim=-1) - lse  # [n]
        probs = (z - lse.unsqueeze(-1)).exp_()  # [n, V]
        entropy = lse - probs.mul_(z).sum(dim=-1)  # [n]  H = lse - sum_v p_v z_v
    return TokenDistributionStats(lse, entropy, mean_logprob)
