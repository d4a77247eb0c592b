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

from collections.abc import Callable
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


def chunked_distribution_stats(
    logits_of: Callable[[slice], Tensor], num_tokens: int, temperature: float, chunk_size: int
) -> TokenDistributionStats:
    """``token_distribution_stats`` of ``num_tokens`` tokens whose logits ``logits_of(rows) -> [c, V]`` are made one
    chunk of ``chunk_size`` rows at a time: peak extra memory a few ``[chunk_size, V]`` buffers, never ``[M, V]``.

    Returns three ``[M]`` tensors (float32, float64 for float64 logits), detached.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts = [
        token_distribution_stats(logits_of(slice(start, min(start + chunk_size, num_tokens))), temperature)
        for start in range(0, num_tokens, chunk_size)
    ]
    if not parts:  # no tokens: empty summaries of the dtype a chunk would have had
        empty = logits_of(slice(0, 0))
        parts = [token_distribution_stats(empty, temperature)]
    return TokenDistributionStats(*(torch.cat(values) for values in zip(*parts, strict=True)))


def hidden_distribution_stats(
    hidden: Tensor, lm_head_weight: Tensor, temperature: float, chunk_size: int, lm_head_bias: Tensor | None = None
) -> TokenDistributionStats:
    """Summaries ``[N, T]`` of ``softmax((hidden @ W.T + b) / T)`` from final hidden states ``[N, T, H]`` and the
    output projection ``W [V, H]`` (``b [V]``), the logits made chunk by chunk (the head matmul in the inputs'
    dtype, the rest in float32, as ``lit_gcpo.algorithms.logprobs.token_logprobs`` does)."""
    n, t, h = hidden.shape
    flat = hidden.detach().reshape(n * t, h)  # [M, H]
    weight = lm_head_weight.detach()
    bias = None if lm_head_bias is None else lm_head_bias.detach()

    def logits_of(rows: slice) -> Tensor:
        return flat[rows] @ weight.T if bias is None else torch.addmm(bias, flat[rows], weight.T)  # [c, V]

    with torch.no_grad():
        stats = chunked_distribution_stats(logits_of, n * t, temperature, chunk_size)
    return TokenDistributionStats(*(values.view(n, t) for values in stats))


def logits_distribution_stats(logits: Tensor, temperature: float, chunk_size: int) -> TokenDistributionStats:
    """Summaries ``[N, T]`` from logits that exist already ``[N, T, V]`` (models whose forward transforms them),
    upcast chunk by chunk."""
    n, t, v = logits.shape
    flat = logits.detach().reshape(n * t, v)  # [M, V], a view
    stats = chunked_distribution_stats(lambda rows: flat[rows], n * t, temperature, chunk_size)
    return TokenDistributionStats(*(values.view(n, t) for values in stats))
