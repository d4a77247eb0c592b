"""Memory-bounded log-probabilities (and entropies) of the sampled tokens.

A policy-gradient step needs log pi(o_t) of the sampled token only, but the naive route materialises
``log_softmax(logits)`` for every position: with Qwen's vocabulary of 151,936 entries, 8 x 1024 tokens
are 5 GB of float32 logits, plus as much again for autograd. Here the flattened tokens are processed in
chunks of ``chunk_size``: each chunk computes ``logit[target] - logsumexp(logits)`` in float32 and drops
its logits. Backward is a custom ``autograd.Function`` that recomputes each chunk's logits from the
saved hidden states and writes d/d logits = (onehot - softmax) * g / T chunk by chunk, so peak extra
memory is a few ``[chunk_size, V]`` float32 buffers in both directions.

Temperature divides the logits, matching the distribution the rollout engine sampled from
(``log_softmax(logits / T)``, before top-k/top-p truncation). The entropy is that of the same
temperature-scaled distribution, H = logsumexp(z) - sum_v p_v z_v with z = logits / T, and its
gradient is dH/dz_v = -p_v (log p_v + H).

Project's reading: matmuls run in the inputs' dtype and everything after them in float32 (float64 for
float64 inputs), as HF models upcast logits before the loss; the gradient of the lm head weight is
accumulated in that dtype and cast to the weight's dtype once. Double backward is not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (which the tests use to check the math exactly)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_forward(z: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-prob of ``targets``, logsumexp and entropy of the float32 scaled logits ``z [c, V]``."""
    lse = torch.logsumexp(z, dim=-1)  # [c]
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [c]
    entropy = None
    if with_entropy:
        probs = (z - lse.unsqueeze(-1)).exp_()  # [c, V]
        entropy = lse - probs.mul_(z).sum(-1)  # [c]
    return logp, lse, entropy


def _chunk_grad_z(
    z: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor | None, g_logp: Tensor, g_entropy: Tensor | None
) -> Tensor:
    """d loss / d z for one chunk; overwrites ``z [c, V]`` (float32) and returns the gradient."""
    log_probs = z.sub_(lse.unsqueeze(-1))  # [c, V] in place
    probs = log_probs.exp()  # [c, V]
    # d logp_t / dz_v = onehot_v - p_v ;  d H / dz_v = -p_v (log p_v + H)
    # => grad_v = g_logp onehot_v - p_v (g_logp + g_H (log p_v + H))
    if g_entropy is not None:
        coeff = log_probs.add_(entropy.unsqueeze(-1)).mul_(g_entropy.unsqueeze(-1))  # [c, V]
        coeff.add_(g_logp.unsqueeze(-1))
        grad = probs.mul_(coeff).neg_()  # [c, V]
    else:
        grad = probs.mul_(-g_logp.unsqueeze(-1))  # [c, V]
    grad.scatter_add_(-1, targets.unsqueeze(-1), g_logp.unsqueeze(-1))
    return grad


PLAIN_LOGITS_ELEMENTS = 2**24
"""Logits of at most this many values (64 MiB in float32) take the plain autograd path of ``token_logprobs``."""


def _check_targets(targets: Tensor, shape: torch.Size) -> None:
    if targets.shape != shape:
        raise ValueError(f"targets must be [N, T] = {tuple(shape)}, got {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be torch.long, got {targets.dtype}")


def _check_common(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy rollouts use 1.0), got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunked_forward(
    rows_source: Tensor,
    scaled_logits: Callable[[slice], Tensor],
    targets: Tensor,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled-token log-prob, log-sum-exp and (optionally) entropy of ``M = len(rows_source)`` tokens, one
    chunk of ``scaled_logits(rows) -> [c, V]`` (a fresh tensor in the compute dtype) at a time.

    Returns ``(logp [M], lse [M], entropy [M] or [0])`` in the compute dtype of ``rows_source``.
    """
    m, dtype = rows_source.shape[0], _compute_dtype(rows_source)
    logp = rows_source.new_empty(m, dtype=dtype)  # [M]
    lse = rows_source.new_empty(m, dtype=dtype)  # [M]
    entropy = rows_source.new_empty(m if with_entropy else 0, dtype=dtype)  # [M] or [0]
    for start in range(0, m, chunk_size):
        rows = slice(start, min(start + chunk_size, m))
        z = scaled_logits(rows)  # [c, V]
        lp, ls, ent = _chunk_forward(z, targets[rows], with_entropy)
        logp[rows], lse[rows] = lp, ls
        if ent is not None:
            entropy[rows] = ent
        del z
    return logp, lse, entropy


ScaledLogits = Callable[[tuple[Tensor | None, ...], slice, float], Tensor]
"""``(inputs, rows, temperature) -> [c, V]``: the float32 (float64) logits of ``rows`` divided by the temperature, a
fresh tensor (modified in place by the caller)."""


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Sampled-token log-probs and entropies of ``M`` rows, chunk by chunk, from inputs whose logits
    ``scaled_logits(inputs, rows, T)`` recomputes (``inputs[0]`` has the rows). ``apply(scaled_logits, targets [M],
    (temperature, chunk_size, with_entropy), *inputs) -> (logp [M], entropy [M] or [0])``. Subclasses write the
    backward from ``_chunk_grads``, each chunk's gradient with respect to its logits."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        scaled_logits: ScaledLogits,
        targets: Tensor,  # [M]
        options: tuple[float, int, bool],
        *inputs: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        temperature, chunk_size, with_entropy = options
        logp, lse, entropy = _chunked_forward(
            inputs[0], lambda rows: scaled_logits(inputs, rows, temperature), targets, chunk_size, with_entropy
        )  # [M], [M], [M] or [0]
        ctx.save_for_backward(*inputs, targets, lse, entropy)
        ctx.scaled_logits, ctx.temperature, ctx.chunk_size, ctx.with_entropy = scaled_logits, *options
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def _chunk_grads(
        ctx: FunctionCtx, g_logp: Tensor | None, g_entropy: Tensor | None
    ) -> Iterator[tuple[slice, Tensor]]:
        """``(rows, d loss / d logits [c, V])`` of each chunk, in the compute dtype, from the saved targets, log-sum-exp
        and entropy and the chunk's recomputed logits."""
        *inputs, targets, lse, entropy = ctx.saved_tensors
        m = lse.shape[0]
        g_logp = lse.new_zeros(m) if g_logp is None else g_logp
        g_entropy = g_entropy if ctx.with_entropy else None
        for start in range(0, m, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, m))
            z = ctx.scaled_logits(tuple(inputs), rows, ctx.temperature)  # [c, V]
            g_ent = None if g_entropy is None else g_entropy[rows].to(lse.dtype)
            ent = entropy[rows] if ctx.with_entropy else None
            gz = _chunk_grad_z(z, targets[rows], lse[rows], ent, g_logp[rows].to(lse.dtype), g_ent)  # [c, V]
            yield rows, (gz.div_(ctx.temperature) if ctx.temperature != 1.0 else gz)  # d z / d logits = 1 / T


def _head_scaled_logits(inputs: tuple[Tensor | None, ...], rows: slice, temperature: float) -> Tensor:
    """``(hidden[rows] @ W.T + b) / T`` of ``inputs = (hidden [M, H], W [V, H], b [V] or None)``."""
    hidden, weight, bias = inputs
    h = hidden[rows]  # [c, H]
    logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)  # [c, V]
    z = logits.to(_compute_dtype(logits))  # [c, V] (a fresh tensor either way: safe to modify in place)
    return z.div_(temperature) if temperature != 1.0 else z


class _HiddenTokenLogprobs(_ChunkedTokenLogprobs):
    """From final hidden states and the output head: ``inputs = (hidden, weight, bias)``."""

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_logp: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias = ctx.saved_tensors[:3]
        need_h, need_w, need_b = ctx.needs_input_grad[3:6]
        dtype = _compute_dtype(hidden)
        grad_h = torch.empty_like(hidden) if need_h else None  # [M, H]
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        for rows, gz in _ChunkedTokenLogprobs._chunk_grads(ctx, g_logp, g_entropy):
            if need_h:
                grad_h[rows] = gz.to(weight.dtype) @ weight  # [c, H]
            if need_w:
                grad_w.addmm_(gz.T, hidden[rows].to(gz.dtype))  # [V, H]
            if need_b:
                grad_b.add_(gz.sum(0))  # [V]
            del gz
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return None, None, None, grad_h, grad_w, grad_b


def token_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    lm_head_bias: Tensor | None = None,
    max_plain_elements: int = PLAIN_LOGITS_ELEMENTS,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``targets`` under ``softmax((hidden @ W.T + b) / T)`` without the full logits.

    When the logits are small (one chunk, or at most ``max_plain_elements`` values) the plain autograd path is
    taken instead: it keeps them for backward rather than recomputing them (one head matmul fewer), which is
    faster where the memory is not an issue; its extra memory is at most a few times that bound.

    Args:
        hidden: final hidden states (after the last norm), ``[N, T, H]``.
        lm_head_weight: the output projection, ``[V, H]`` (tied embeddings work: pass the embedding).
        targets: the token whose log-prob is wanted at each position, ``[N, T]`` long, values in
            ``[0, V)`` (put any valid id, e.g. the pad id, on padding and mask it later).
        temperature: the sampling temperature T > 0 (logits are divided by it).
        chunk_size: flattened tokens per chunk; peak extra memory is a few ``[chunk_size, V]`` float32.
        with_entropy: also return the entropy of the temperature-scaled distribution.
        lm_head_bias: optional output bias, ``[V]``.
        max_plain_elements: the largest ``N * T * V`` computed by the plain path (0: always chunked).

    Returns:
        ``(logprobs [N, T], entropy [N, T] or None)`` in float32 (float64 for float64 inputs),
        differentiable w.r.t. ``hidden``,
        ``lm_head_weight`` and ``lm_head_bias``.
    """
    _check_common(temperature, chunk_size)
    if hidden.ndim != 3 or lm_head_weight.ndim != 2 or hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(
            f"hidden must be [N, T, H] and lm_head_weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(lm_head_weight.shape)}"
        )
    _check_targets(targets, hidden.shape[:2])
    n, t, h = hidden.shape
    vocab = lm_head_weight.shape[0]
    if n * t <= chunk_size or n * t * vocab <= max_plain_elements:
        flat = hidden.reshape(n * t, h)
        logits = flat @ lm_head_weight.T if lm_head_bias is None else torch.addmm(lm_head_bias, flat, lm_head_weight.T)
        z = logits.to(_compute_dtype(logits))  # [N*T, V]
        log_probs = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)  # [N*T, V]
        logp = log_probs.gather(-1, targets.reshape(-1, 1)).view(n, t)
        entropy = -(log_probs.exp() * log_probs).sum(-1).view(n, t) if with_entropy else None
        return logp, entropy
    logp, entropy = _HiddenTokenLogprobs.apply(
        _head_scaled_logits,
        targets.reshape(-1),
        (temperature, chunk_size, with_entropy),
        hidden.reshape(n * t, h),
        lm_head_weight,
        lm_head_bias,
    )  # [N*T], [N*T] or [0]
    return logp.view(n, t), (entropy.view(n, t) if with_entropy else None)


def _copied_scaled_logits(inputs: tuple[Tensor | None, ...], rows: slice, temperature: float) -> Tensor:
    """``logits[rows]`` of ``inputs = (logits [M, V],)`` copied to the compute dtype and divided by T."""
    logits = inputs[0]
    return logits[rows].to(_compute_dtype(logits), copy=True).div_(temperature)  # [c, V]


class _LogitsTokenLogprobs(_ChunkedTokenLogprobs):
    """From logits that exist already: ``inputs = (logits,)``."""

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g_logp: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        grad = torch.empty_like(ctx.saved_tensors[0])  # [M, V] in the logits' dtype: the one unavoidable full buffer
        for rows, gz in _ChunkedTokenLogprobs._chunk_grads(ctx, g_logp, g_entropy):
            grad[rows] = gz
            del gz
        return None, None, None, grad


def logprobs_from_logits(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked log-probs (and entropies) of ``targets`` when the model's logits already exist.

    Args:
        logits: ``[N, T, V]`` in any float dtype (bf16 is upcast per chunk, never as a whole).
        targets: ``[N, T]`` long.
        temperature: sampling temperature T > 0.
        chunk_size: flattened tokens per chunk.
        with_entropy: also return the entropy of the temperature-scaled distribution.

    Returns:
        ``(logprobs [N, T], entropy [N, T] or None)`` in float32 (float64 for float64 logits),
        differentiable w.r.t. ``logits``.
    """
    _check_common(temperature, chunk_size)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [N, T, V], got {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[:2])
    n, t, v = logits.shape
    logp, entropy = _LogitsTokenLogprobs.apply(
        _copied_scaled_logits, targets.reshape(-1), (temperature, chunk_size, with_entropy), logits.reshape(n * t, v)
    )  # [N*T], [N*T] or [0]
    return logp.view(n, t), (entropy.view(n, t) if with_entropy else None)
