"""The faithfulness diagnostic (METHODS.md §6): V against a plain loop and hand values, correlations against
hand-derived ranks and scipy, per-completion gradients against one batched backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lit_gcpo.algorithms.faithfulness import (
    completion_gradients,
    faithfulness,
    gradient_variance,
    spearman,
    stratified_spearman,
)


def test_gradient_variance_hand_values_and_plain_loop() -> None:
    # Group 0: g = (1, 0), (-1, 0): g_bar = 0, sum |g_i - g_bar|^2 = 2, V = 2 / (2 * 1) = 1.
    # Group 1: g = (1, 1), (1, 1), (4, 1): g_bar = (2, 1), sum = 1 + 1 + 4 = 6, V = 6 / (3 * 2) = 1.
    # Group 2: one completion: V = 0.
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [4.0, 1.0], [7.0, 7.0]])
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    torch.testing.assert_close(
        gradient_variance(grads, group_ids, 3), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 5, (40,), generator=generator)
    grads = torch.randn(40, 7, generator=generator, dtype=torch.float64) * 3 + 1
    expected = []
    for group in range(5):
        members = [grads[i] for i in range(40) if group_ids[i] == group]
        size = len(members)
        mean = sum(members) / size
        expected.append(sum(float((g - mean) @ (g - mean)) for g in members) / (size * (size - 1)))
    torch.testing.assert_close(gradient_variance(grads, group_ids, 5), torch.tensor(expected, dtype=torch.float64))


def test_stratified_spearman_hand_values() -> None:
    # Strata A: x (1, 2), y (10, 20); B: x (3, 4), y (5, 6). Overall ranks x (1, 2, 3, 4), y (3, 4, 1, 2):
    # d = (-2, -2, 2, 2), rho = 1 - 6 * 16 / (4 * 15) = -0.6. Centred within each stratum both rank vectors are
    # (-0.5, 0.5, -0.5, 0.5): the within-strata correlation is 1.
    x, y, strata = np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 5, 6]), np.array([0, 0, 1, 1])
    assert spearman(x, y) == pytest.approx(-0.6)
    assert stratified_spearman(x, y, strata) == pytest.approx(1.0)
    assert math.isnan(stratified_spearman(x, y, np.arange(4)))  # one prompt per stratum: nothing varies
    assert math.isnan(spearman(np.ones(4), y))


def test_faithfulness_uses_the_spread_prompts_and_reports_the_length_control() -> None:
    rng = np.random.default_rng(1)
    prompts = 60
    rd = np.where(np.arange(prompts) % 3 == 0, 0.0, rng.choice([0.66, 0.87, 1.0], size=prompts))
    signal = rng.random(prompts)
    variance = np.where(rd > 0, signal**2 + 0.01 * rng.random(prompts), 0.0)  # V grows with the signal
    lengths = rng.random(prompts)
    results = faithfulness({"bot": signal, "rd": rd}, variance, rd, lengths, resamples=300, seed=0)
    assert set(results) == {"bot", "rd", "length"}
    spread = rd > 0
    bot = results["bot"]
    assert bot.spread_prompts.value == pytest.approx(stats.spearmanr(signal[spread], variance[spread]).statistic)
    assert bot.all_prompts.value == pytest.approx(stats.spearmanr(signal, variance).statistic)
    assert bot.spread_prompts.value > 0.95 and bot.spread_prompts.excludes_zero
    assert bot.spread_prompts.low <= bot.spread_prompts.value <= bot.spread_prompts.high
    assert bot.within_rd.value > 0.9
    assert results["length"].spread_prompts.value == pytest.approx(
        stats.spearmanr(lengths[spread], variance[spread]).statistic
    )
    assert not results["length"].spread_prompts.excludes_zero  # an unrelated control: interval covers 0
    with pytest.raises(ValueError, match="signal 'bot'"):
        faithfulness({"bot": signal[:10]}, variance, rd, lengths, resamples=10)


def test_completion_gradients_sum_to_one_batched_backward(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    params = [p for p in model.parameters() if p.requires_grad]
    # two completions of one prompt, left-padded prompt (pad 0) and right-padded completions
    input_ids = torch.tensor([[0, 9, 10, 11, 12, 13, 0], [0, 9, 10, 11, 14, 15, 16]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def logprobs_of(ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -length - 1 : -1]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -length:, None]).squeeze(-1)  # [b, L]

    grads = completion_gradients(logprobs_of, input_ids, attention, completion_mask, advantages, params, [0, 1])
    # the same two completions in one padded batch: sum_i A_i sum_t m log pi, one backward
    logprobs = logprobs_of(input_ids, attention, 3)  # [2, 3]
    total = ((logprobs * completion_mask).sum(-1) * advantages).sum()
    batched = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
    # rotary tables stay float32 in the double model, so agreement is to ~1e-7 of the norm, not exact
    assert float((grads.sum(0) - batched).norm() / batched.norm()) < 1e-5
    assert grads[0].norm() > 0 and grads[1].norm() > 0
