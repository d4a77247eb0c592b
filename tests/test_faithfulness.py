"""The faithfulness diagnostic (METHODS.md §6): V against a plain loop and hand values, correlations against
hand-derived ranks and scipy, the partial correlation against the inverse correlation matrix, the paired difference
against a plain bootstrap loop, strata by k, the weight ratio by k by hand, per-completion gradients against one
batched backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lit_gcpo.algorithms.faithfulness import (
    completion_gradients,
    correct_counts,
    correlation_differences,
    faithfulness,
    gradient_variance,
    partial_spearman,
    spearman,
    stratified_spearman,
    weight_ratio_by_k,
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
    assert bot.within_strata.value > 0.9
    assert results["length"].spread_prompts.value == pytest.approx(
        stats.spearmanr(lengths[spread], variance[spread]).statistic
    )
    assert not results["length"].spread_prompts.excludes_zero  # an unrelated control: interval covers 0
    with pytest.raises(ValueError, match="signal 'bot'"):
        faithfulness({"bot": signal[:10]}, variance, rd, lengths, resamples=10)


def test_strata_by_k_separate_k_and_g_minus_k() -> None:
    # G = 4: k = 1 and k = 3 correct have the same RD, sqrt(0.25 x 0.75) / 0.5 = 0.866. With the hand case of
    # test_stratified_spearman_hand_values as k = 1 (x 1, 2; V 10, 20) and k = 3 (x 3, 4; V 5, 6): strata by k give
    # rho 1, strata by RD merge the two into one stratum and give the overall -0.6.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, math.nan, 1, 1, 1])
    k = correct_counts(rewards, torch.arange(20) // 4, 5)
    np.testing.assert_array_equal(k, [1, 1, 3, 3, 3])  # the NaN reward of group 4 is left out
    x, v, rd = np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 5, 6]), np.full(4, math.sqrt(0.1875) / 0.5)
    by_k = faithfulness({"bot": x}, v, rd, np.zeros(4), strata=k[:4], resamples=50)
    by_rd = faithfulness({"bot": x}, v, rd, np.zeros(4), resamples=50)
    assert by_k["bot"].within_strata.value == pytest.approx(1.0)
    assert by_rd["bot"].within_strata.value == pytest.approx(-0.6)
    with pytest.raises(ValueError, match="0/1 rewards"):
        correct_counts(torch.tensor([0.5, 1.0]), torch.tensor([0, 0]), 1)


def test_partial_spearman_hand_value_and_inverse_correlation_matrix() -> None:
    # ranks x (1, 2, 3, 4), y (1, 3, 2, 4), z (1, 2, 4, 3): sum d^2 = 2, 2, 6, so r_xy = 1 - 6 x 2 / 60 = 0.8,
    # r_xz = 0.8, r_yz = 1 - 36 / 60 = 0.4; partial = (0.8 - 0.32) / sqrt(0.36 x 0.84) = 0.8 / sqrt(0.84) = 0.8729
    x, y, z = np.array([1.0, 2, 3, 4]), np.array([10.0, 30, 20, 40]), np.array([0.1, 0.2, 0.9, 0.5])
    assert partial_spearman(x, y, z) == pytest.approx(0.8 / math.sqrt(0.84), rel=1e-12)
    assert math.isnan(partial_spearman(x, y, x * 3))  # x is a monotone function of the control: nothing is left
    rng = np.random.default_rng(4)
    for _ in range(5):
        z = rng.integers(0, 8, size=60).astype(float)  # ties, like lengths in tokens
        x, y = z + rng.normal(0, 3, 60), z + rng.normal(0, 3, 60)
        precision = np.linalg.inv(np.corrcoef([stats.rankdata(a) for a in (x, y, z)]))  # [3, 3]
        expected = -precision[0, 1] / math.sqrt(precision[0, 0] * precision[1, 1])
        assert partial_spearman(x, y, z) == pytest.approx(expected, rel=1e-9)
        assert abs(expected) < abs(spearman(x, y))  # the shared length is what made x and y correlate


def test_correlation_difference_is_paired_against_a_plain_bootstrap_loop() -> None:
    rng = np.random.default_rng(2)
    prompts = 40
    rd = np.where(np.arange(prompts) % 4 == 0, 0.0, 0.5)
    v = rng.random(prompts)
    se, bot = v + rng.normal(0, 0.3, prompts), v + rng.normal(0, 0.1, prompts)
    signals = {"se": se, "bot": bot, "twin": bot.copy()}
    lengths = rng.random(prompts)
    differences = correlation_differences(signals, v, rd, lengths, [("bot", "se")], resamples=400, seed=3)
    spread = rd > 0
    a, b, w = bot[spread], se[spread], v[spread]
    draws = []
    for picks in np.random.default_rng(3).integers(0, spread.sum(), size=(400, spread.sum())):
        draws.append(stats.spearmanr(a[picks], w[picks]).statistic - stats.spearmanr(b[picks], w[picks]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5])
    result = differences["bot - se"].spread_prompts
    assert (result.low, result.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    single = faithfulness(signals, v, rd, lengths, resamples=400, seed=3)
    assert result.value == pytest.approx(single["bot"].spread_prompts.value - single["se"].spread_prompts.value)
    assert single["twin"] == single["bot"]  # every signal resamples the same prompts
    # V itself against -V: +1 minus -1 on every resample
    exact = correlation_differences({"a": v, "b": -v}, v, rd, lengths, [("a", "b")], resamples=100)["a - b"]
    assert (exact.spread_prompts.value, exact.spread_prompts.low, exact.spread_prompts.high) == pytest.approx((2, 2, 2))


def test_weight_ratio_by_k_hand_values() -> None:
    # k = 1: noisy 0.5, 0.7 (mean 0.6), clean 1.0; k = 2: noisy 0.8, clean 0.9, 1.1 (mean 1.0); k = 3 clean only and
    # k = 4 noisy only do not count. Standardised to the noisy k mix (2 at k = 1, 1 at k = 2):
    # noisy (2 x 0.6 + 0.8) / 3 = 2/3, clean (2 x 1.0 + 1.0) / 3 = 1, ratio 2/3. Unmatched: noisy mean
    # (0.5 + 0.7 + 0.8 + 0.3) / 4 = 0.575, clean (1.0 + 0.9 + 1.1 + 1.2) / 4 = 1.05, raw ratio 0.5476.
    weights = np.array([0.5, 0.7, 1.0, 0.8, 0.9, 1.1, 1.2, 0.3])
    noisy = np.array([1, 1, 0, 1, 0, 0, 0, 1], dtype=bool)
    k = np.array([1, 1, 1, 2, 2, 2, 3, 4])
    result = weight_ratio_by_k(weights, noisy, k)
    assert (result.ratio, result.noisy_mean, result.clean_standardised) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert result.raw_ratio == pytest.approx(0.575 / 1.05)
    assert [row[:3] for row in result.strata] == [(1, 2, 1), (2, 1, 2)]
    assert [row[3:] for row in result.strata] == [pytest.approx((0.6, 1.0)), pytest.approx((0.8, 1.0))]


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


def test_label_free_signals_by_hand_and_in_the_diagnostic() -> None:
    from lit_gcpo.algorithms.label_free import label_free_signals

    # Group 0: answers 1, 1, 1, 2 -> majority 3/4; cluster share = (3/4 * 3 + 1/4) / 4 = 9/16 + 1/16 = 0.625.
    # Group 1: 5, none, 6, none -> the tie goes to 5: majority 1/4; share (1/4 + 1/4 + 0 + 0) / 4 = 0.125.
    clusters = torch.tensor([0, 0, 0, 1, 0, 1, 2, 3])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    answered = torch.tensor([True, True, True, True, True, False, True, False])
    # completion mean entropies: group 0 rows 0.2, 0.2, 0.5, 0.5 -> 0.35; group 1 all 0.4 -> 0.4; the last token of
    # row 3 is padding (its 9.0 is not counted). Self-certainty -log V - mean log p = c with mean log p = -log 4 - c.
    entropy = torch.tensor([[0.1, 0.3], [0.2, 0.2], [0.5, 0.5], [0.5, 9.0]] + [[0.4, 0.4]] * 4)
    mask = torch.ones(8, 2)
    mask[3, 1] = 0.0
    signals = label_free_signals(
        clusters, group_ids, 2, answered, token_entropy=entropy, token_mean_logprob=-math.log(4) - entropy, mask=mask,
        vocab_size=4,
    )  # fmt: skip
    expected = {"majority": [0.75, 0.25], "cluster_share": [0.625, 0.125], "token_entropy": [0.35, 0.4],
                "self_certainty": [0.35, 0.4]}  # fmt: skip
    for name, values in expected.items():
        torch.testing.assert_close(signals[name], torch.tensor(values, dtype=torch.float64), atol=1e-6, rtol=0)
    # without token summaries: the answer signals only
    assert set(label_free_signals(clusters, group_ids, 2, answered)) == {"majority", "cluster_share"}
    # the diagnostic correlates them with V like any signal
    rng = np.random.default_rng(0)
    per_prompt = {name: rng.random(40) for name in expected}
    results = faithfulness(per_prompt, rng.random(40), rng.random(40) + 0.1, rng.random(40), resamples=50)
    assert set(expected) < set(results) and all(math.isfinite(results[name].all_prompts.value) for name in expected)
