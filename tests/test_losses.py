from __future__ import annotations

import math

import pytest
import torch

from lit_gcpo.algorithms.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate_loss,
    grpo_loss,
    kl_penalty,
    policy_loss,
    rollout_correction_weights,
)

E05 = math.exp(0.5)  # 1.64872
EM05 = math.exp(-0.5)  # 0.60653


def _two_column(log_ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One real token per row (column 0) and a padding column holding -inf log-probs."""
    logp = torch.tensor([[lr, float("-inf")] for lr in log_ratios], requires_grad=True)  # [N, 2]
    old = torch.tensor([[0.0, float("-inf")] for _ in log_ratios])  # [N, 2]
    mask = torch.tensor([[1.0, 0.0] for _ in log_ratios])  # [N, 2]
    return logp, old, mask


def test_each_clip_region_by_hand():
    # row 0: rho = e^0.5 = 1.649, A = +1 -> clipped at 1 + 0.2: l = -1.2, gradient 0 (clip_frac_high)
    # row 1: rho = e^0.5,          A = -1 -> -min(-1.649, -1.2) = +1.649 unclipped, dl/dlogp = -A rho = 1.649
    # row 2: rho = e^-0.5 = 0.607, A = +1 -> -min(0.607, 0.8) = -0.607 unclipped, dl/dlogp = -0.607
    # row 3: rho = e^-0.5,         A = -1 -> -min(-0.607, -0.8) = +0.8, clipped at 1 - 0.2 (clip_frac_low)
    logp, old, mask = _two_column([0.5, 0.5, -0.5, -0.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = policy_loss(logp, old, adv, mask)
    expected = torch.tensor([[-1.2, 0.0], [E05, 0.0], [-EM05, 0.0], [0.8, 0.0]])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[:, 0], torch.tensor([0.0, E05, -EM05, 0.0]), rtol=1e-6, atol=1e-7)
    assert grad[:, 1].eq(0).all()  # padding gets no gradient (and no NaN from -inf - -inf)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert metrics["ratio_max"].item() == pytest.approx(E05)
    assert metrics["ratio_min"].item() == pytest.approx(EM05)
    assert metrics["ratio_mean"].item() == pytest.approx((E05 + EM05) / 2)
    # approx KL (k3 of KL(old||current)): rho - 1 - log rho, mean of e^.5 - 1.5 and e^-.5 - .5
    assert metrics["approx_kl"].item() == pytest.approx(((E05 - 1.5) + (EM05 - 0.5)) / 2, rel=1e-6)


def test_clip_higher_uses_eps_high():
    # rho = e^0.5 = 1.649 with A = +1 under eps_high = 0.28 (DAPO): clipped at 1.28 -> -1.28
    logp, old, mask = _two_column([0.5])
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)


def test_dual_clip_caps_negative_advantage_loss():
    # row 0: rho = e^1.5 = 4.482, A = -1: PPO loss 4.482 > c * |A| = 3 -> capped at 3, no gradient
    # row 1: rho = e^0.5 = 1.649, A = -1: 1.649 < 3, unchanged
    # row 2: rho = e^1.5, A = +2: clipped at 1.2 -> -2.4; dual clip does not touch A > 0
    logp, old, mask = _two_column([1.5, 0.5, 1.5])
    adv = torch.tensor([-1.0, -1.0, 2.0])
    loss, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(loss[:, 0], torch.tensor([3.0, E05, -2.4]), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[:, 0], torch.tensor([0.0, E05, 0.0]), rtol=1e-6, atol=1e-7)
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_gspo_sequence_ratio():
    # Both rows: token log-ratios [0.2, 0.4] and a padding token (log-ratio 5, masked out).
    # Sequence ratio exp((0.2 + 0.4) / 2) = e^0.3 = 1.34986 on every real token.
    # row 0, A = +1: clipped at 1.2 -> -1.2 per token.
    # row 1, A = -1: unclipped, +1.34986 per token; d(sum of row)/d logp_t = 2 * rho * (1/2) = rho.
    logp = torch.tensor([[0.2, 0.4, 5.0], [0.2, 0.4, 5.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, ratio_level="sequence")
    rho = math.exp(0.3)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, 0.0], [rho, rho, 0.0]]), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [rho, rho, 0.0]]), rtol=1e-6, atol=1e-7)
    assert metrics["ratio_mean"].item() == pytest.approx(rho)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.5)


def test_truncated_importance_weights_by_hand():
    # token_truncate with C_min None is truncated IS. diffs trainer - engine = [0.1, 1.0, -0.5] (+ padding):
    # weights exp(0.1) = 1.10517, min(e, 2) = 2, exp(-0.5) = 0.60653; padding weight 1. |diff| mean = 1.6 / 3,
    # max 1, 1/3 of the tokens (in the 1 sequence) truncated.
    trainer = torch.tensor([[-1.0, -2.0, -3.0, -7.0]])
    engine = torch.tensor([[-1.1, -3.0, -2.5, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, metrics = rollout_correction_weights(trainer, engine, mask, "token_truncate", c_min=None, c_max=2.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.1), 2.0, EM05, 1.0]]), rtol=1e-5, atol=1e-6)
    assert metrics["mismatch_abs_mean"].item() == pytest.approx(1.6 / 3, rel=1e-5)
    assert metrics["mismatch_abs_max"].item() == pytest.approx(1.0, rel=1e-5)
    assert metrics["correction_truncated_token_frac"].item() == pytest.approx(1 / 3)
    assert metrics["correction_truncated_seq_frac"].item() == pytest.approx(1.0)
    # The weights multiply the policy loss: on-policy (rho = 1), A = 1 -> l = -w.
    logp = torch.full((1, 4), -1.0)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0]), mask, is_weights=weights)
    torch.testing.assert_close(loss, torch.tensor([[-math.exp(0.1), -2.0, -EM05, 0.0]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("estimator", "values", "grads"),
    [
        # logp = -1, ref = -2 (d = ref - logp = -1) and logp = -2, ref = -1 (d = +1)
        # k1 = logp - ref: 1, -1; d k1 / d logp = 1
        ("k1", [1.0, -1.0], [1.0, 1.0]),
        # k2 = 0.5 (logp - ref)^2: 0.5, 0.5; gradient logp - ref: 1, -1
        ("k2", [0.5, 0.5], [1.0, -1.0]),
        # k3 = e^d - d - 1: e^-1 = 0.36788, e - 2 = 0.71828; gradient 1 - e^d: 0.63212, 1 - e = -1.71828
        ("k3", [math.exp(-1), math.e - 2], [1 - math.exp(-1), 1 - math.e]),
    ],
)
def test_kl_estimators_by_hand(estimator, values, grads):
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl, metrics = kl_penalty(logp, ref, estimator, mask=mask)
    torch.testing.assert_close(kl, torch.tensor([[*values, 0.0]]), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor([[*grads, 0.0]]), rtol=1e-6, atol=1e-7)
    assert metrics["kl_mean"].item() == pytest.approx(sum(values) / 2, rel=1e-6)
    assert metrics["kl_max"].item() == pytest.approx(max(values), rel=1e-6)


def test_unknown_names_list_valid_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(x, x, "k4")
    names = "seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean"
    with pytest.raises(ValueError, match=names):
        aggregate_loss(x, x, "mean")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(x, x, torch.zeros(1), x, ratio_level="seq")
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"] and len(AGGREGATIONS) == 4


# Token losses [[1, 2, 3], [4, 5, pad]]; the padding holds NaN, which must not leak.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_aggregation_modes_by_hand():
    # token_mean: (1 + 2 + 3 + 4 + 5) / 5 tokens = 3
    assert aggregate_loss(LOSS, MASK, "token_mean").item() == pytest.approx(3.0)
    # seq_mean_token_mean: (6 / 3 + 9 / 2) / 2 sequences = (2 + 4.5) / 2 = 3.25
    assert aggregate_loss(LOSS, MASK, "seq_mean_token_mean").item() == pytest.approx(3.25)
    # seq_mean_token_sum_norm with L_max = 4: 15 / (2 * 4) = 1.875
    assert aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(1.875)
    # Given global counts replace the local ones: 15 / 10 tokens; (2 + 4.5) / 5 sequences
    assert aggregate_loss(LOSS, MASK, "token_mean", num_tokens=10).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS, MASK, "seq_mean_token_mean", num_seqs=5).item() == pytest.approx(1.3)
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("seed", range(5))
def test_aggregation_is_invariant_to_micro_batch_split(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    n, length = 13, 9
    loss = torch.randn(n, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (n,), generator=gen)  # some sequences may be empty
    mask = (torch.arange(length) < lengths[:, None]).double()  # [N, L]
    full = aggregate_loss(loss, mask, mode, max_len=length)
    perm = torch.randperm(n, generator=gen)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[:3].add(1).tolist())
    counts = {"num_tokens": mask.sum(), "num_seqs": n}
    micro = [
        aggregate_loss(loss[idx], mask[idx], mode, max_len=length, **counts) for idx in torch.tensor_split(perm, cuts)
    ]
    torch.testing.assert_close(torch.stack(micro).sum(), full, rtol=1e-12, atol=1e-12)


def test_grpo_loss_composes_policy_kl_and_entropy_bonus():
    # On-policy (rho = 1), A = [1, -1]: policy token losses -1, -1 | +1, +1 -> token mean 0.
    # KL: logp = -1, ref = -2 on every token -> k3 = e^-1 = 0.36788 per token, beta = 0.5 -> 0.18394.
    # Entropy H = [[1, 2], [3, 4]] -> mean 2.5, c_H = 0.1 -> -0.25.
    # Total 0 + 0.18394 - 0.25 = -0.06606.
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss, metrics = grpo_loss(
        logp,
        logp.detach(),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 2),
        ref_logp=torch.full((2, 2), -2.0),
        beta=0.5,
        entropy=entropy,
        entropy_coef=0.1,
    )
    assert loss.item() == pytest.approx(0.5 * math.exp(-1) - 0.25, rel=1e-6)
    assert metrics["kl_loss"].item() == pytest.approx(math.exp(-1), rel=1e-6)
    assert metrics["entropy_mean"].item() == pytest.approx(2.5)
    assert metrics["policy_loss"].item() == pytest.approx(0.0, abs=1e-7)
    # The entropy bonus pushes entropy up: d loss / d H = -c_H / 4 tokens.
    (grad_h,) = torch.autograd.grad(loss, entropy)
    torch.testing.assert_close(grad_h, torch.full((2, 2), -0.025))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 2), beta=0.1)
