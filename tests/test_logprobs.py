from __future__ import annotations

import math

import pytest
import torch

from lit_gcpo.algorithms.logprobs import PLAIN_LOGITS_ELEMENTS, logprobs_from_logits, token_logprobs

N, T, H, V = 3, 7, 16, 97  # N * T = 21 tokens


def _inputs(seed: int = 0, with_bias: bool = False, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=gen, dtype=dtype)  # [N, T, H]
    weight = torch.randn(V, H, generator=gen, dtype=dtype) * 0.5  # [V, H]
    bias = torch.randn(V, generator=gen, dtype=dtype) if with_bias else None  # [V]
    targets = torch.randint(0, V, (N, T), generator=gen)  # [N, T]
    g_logp = torch.randn(N, T, generator=gen, dtype=dtype)  # upstream gradients
    g_ent = torch.randn(N, T, generator=gen, dtype=dtype)
    return hidden, weight, bias, targets, g_logp, g_ent


# float64 checks the math itself (only summation order differs); float32 is the production dtype and
# is compared with the float64 reference (its error is float32 rounding of ~100-term sums).
TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def _reference(hidden, weight, bias, targets, temperature):
    """Independent implementation in float64: the full log_softmax, then gather."""
    logits = hidden @ weight.T + (0 if bias is None else bias)  # [N, T, V]
    log_probs = torch.log_softmax(logits / temperature, dim=-1)  # [N, T, V]
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N, T]
    return logp, entropy


def test_uniform_distribution_by_hand():
    # Zero weights -> all logits 0 -> uniform over V: log p = -log V, entropy = log V.
    hidden = torch.randn(2, 3, H)
    logp, entropy = token_logprobs(
        hidden, torch.zeros(V, H), torch.zeros(2, 3, dtype=torch.long), chunk_size=4, with_entropy=True
    )
    torch.testing.assert_close(logp, torch.full((2, 3), -math.log(V)))
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(V)))


# max_plain_elements 0: the chunked autograd function unless one chunk holds every token (21 and 1024); the
# default: these small logits take the plain path whatever the chunk size
@pytest.mark.parametrize("max_plain_elements", [0, PLAIN_LOGITS_ELEMENTS])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])  # 4 and 5 do not divide N * T = 21
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_full_log_softmax_values_and_gradients(
    chunk_size, temperature, with_bias, dtype, max_plain_elements
):
    hidden, weight, bias, targets, g_logp, g_ent = _inputs(chunk_size, with_bias, dtype)
    tol = TOLERANCES[dtype]
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if with_bias else [])
    logp, entropy = token_logprobs(
        hidden,
        weight,
        targets,
        temperature,
        chunk_size,
        with_entropy=True,
        lm_head_bias=bias,
        max_plain_elements=max_plain_elements,
    )
    assert logp.dtype == dtype and logp.shape == (N, T)
    grads = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), leaves)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_bias = ref_leaves[2] if with_bias else None
    ref_logp, ref_entropy = _reference(ref_leaves[0], ref_leaves[1], ref_bias, targets, temperature)
    ref_grads = torch.autograd.grad(
        (ref_logp * g_logp.double()).sum() + (ref_entropy * g_ent.double()).sum(), ref_leaves
    )
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **tol)


def test_logprob_only_gradients_without_entropy():
    hidden, weight, _, targets, g_logp, _ = _inputs(3, dtype=torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    logp, entropy = token_logprobs(hidden, weight, targets, chunk_size=6, max_plain_elements=0)
    assert entropy is None
    grads = torch.autograd.grad((logp * g_logp).sum(), [hidden, weight])
    ref_h, ref_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_logp, _ = _reference(ref_h, ref_w, None, targets, 1.0)
    ref_grads = torch.autograd.grad((ref_logp * g_logp).sum(), [ref_h, ref_w])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_frozen_lm_head_gets_no_gradient():
    hidden, weight, _, targets, _, _ = _inputs(4)
    hidden.requires_grad_()
    logp, _ = token_logprobs(hidden, weight, targets, chunk_size=8, max_plain_elements=0)
    logp.sum().backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [1, 8, 21])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logprobs_from_logits_equals_full_log_softmax(chunk_size, temperature, dtype):
    gen = torch.Generator().manual_seed(chunk_size)
    logits = (torch.randn(N, T, V, generator=gen, dtype=dtype) * 3).requires_grad_()  # [N, T, V]
    targets = torch.randint(0, V, (N, T), generator=gen)
    g_logp = torch.randn(N, T, generator=gen, dtype=dtype)
    g_ent = torch.randn(N, T, generator=gen, dtype=dtype)
    tol = TOLERANCES[dtype]
    logp, entropy = logprobs_from_logits(logits, targets, temperature, chunk_size, with_entropy=True)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), logits)

    ref_logits = logits.detach().double().requires_grad_()
    log_probs = torch.log_softmax(ref_logits / temperature, dim=-1)
    ref_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)
    (ref_grad,) = torch.autograd.grad(
        (ref_logp * g_logp.double()).sum() + (ref_entropy * g_ent.double()).sum(), ref_logits
    )
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


def test_bfloat16_logits_are_upcast_per_chunk():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, V, generator=gen).bfloat16()
    targets = torch.randint(0, V, (2, 3), generator=gen)
    logp, _ = logprobs_from_logits(logits, targets, chunk_size=2)
    # The reference upcasts the same bf16 values as a whole: results agree to float32 precision.
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_name_the_field():
    hidden, weight, _, targets, _, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:, :-1])
