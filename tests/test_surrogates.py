"""The policy-loss surrogates CISPO, SAPO, VESPO and LUSPO's aggregation: hand-derived values, a plain loop over
tokens written from each paper's formula (loss and gradient), their composition in ``grpo_loss``, and the options'
checks (TRL 1.16's own numbers: ``tests/test_surrogates_trl.py``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from lit_gcpo.algorithms.losses import aggregate_loss, grpo_loss
from lit_gcpo.algorithms.surrogate_options import CISPO, SAPO, VESPO, surrogate_problem
from lit_gcpo.algorithms.surrogates import SURROGATES, cispo_loss, policy_loss, sapo_loss, vespo_loss
from lit_gcpo.algorithms.token_selection import ClipCov, HighEntropyTokens, KLCov
from lit_gcpo.running.cli import main
from lit_gcpo.training.module import GRPOModule

REPO = Path(__file__).parents[1]

INF = float("inf")
E05, EM05, E2 = math.exp(0.5), math.exp(-0.5), math.exp(2.0)


def _one_token_rows(log_ratios: list[float], old: float = -3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One real token per row (column 0, log-prob old + log-ratio) and a padding column holding -inf."""
    logp = torch.tensor([[old + lr, -INF] for lr in log_ratios], dtype=torch.float64, requires_grad=True)
    old_logp = torch.tensor([[old, -INF] for _ in log_ratios], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0] for _ in log_ratios], dtype=torch.float64)
    return logp, old_logp, mask


def test_cispo_by_hand():
    # old log-prob -3 on every row; l = -min(r, 5) A logp, dl/dlogp = -min(r, 5) A (the weight is detached).
    # row 0: r = e^0.5 = 1.64872, A = +1, logp = -2.5: l = 1.64872 * 2.5 = 4.12180, grad -1.64872
    # row 1: r = e^2 = 7.389 capped at 5, A = +1, logp = -1: l = 5, grad -5
    # row 2: r = e^-0.5 = 0.60653, A = -1, logp = -3.5: l = -(0.60653)(-1)(-3.5) = -2.12286, grad +0.60653
    # row 3: r = e^2 capped at 5, A = -1, logp = -1: l = -5, grad +5 (capped for either sign: nothing is dropped)
    logp, old, mask = _one_token_rows([0.5, 2.0, -0.5, 2.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, metrics = cispo_loss(logp, old, adv, mask, max_ratio=5.0)
    torch.testing.assert_close(loss[:, 0], torch.tensor([4.1218032, 5.0, -2.1228573, -5.0], dtype=torch.float64))
    assert loss[:, 1].eq(0).all()
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[:, 0], torch.tensor([-E05, -5.0, EM05, 5.0], dtype=torch.float64))
    assert grad[:, 1].eq(0).all()  # padding: no gradient, no NaN from -inf
    assert metrics["cispo_clip_frac"].item() == pytest.approx(0.5)  # rows 1 and 3
    assert metrics["ratio_max"].item() == pytest.approx(E2) and metrics["ratio_min"].item() == pytest.approx(EM05)


def test_sapo_by_hand():
    # f(r) = sigmoid(tau (r - 1)) 4 / tau, l = -f(r) A, dl/dlogp = -4 s (1 - s) r A (s the sigmoid).
    # row 0: r = e^0.5 = 1.64872, A = +1, tau_pos = 1: s = sigmoid(0.64872) = 0.65672, l = -4 s = -2.62689,
    #        gate 4 s (1 - s) = 0.90175, grad -0.90175 * 1.64872 = -1.48674
    # row 1: r = e^-0.5 = 0.60653, A = -1, tau_neg = 2: s = sigmoid(2 (r - 1)) = sigmoid(-0.78694) = 0.31283,
    #        l = +4 s / 2 = 0.62565, gate 0.85986, grad +0.85986 * 0.60653 = +0.52153
    # row 2: r = 1 (on-policy), A = +2: s = 1/2, l = -(4 / 2 / 1) 2 = -4, gate 1, grad -1 * 1 * 2 = -2: GRPO's
    logp, old, mask = _one_token_rows([0.5, -0.5, 0.0])
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    loss, metrics = sapo_loss(logp, old, adv, mask, tau_pos=1.0, tau_neg=2.0)
    torch.testing.assert_close(loss[:, 0], torch.tensor([-2.6268890, 0.6256527, -4.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1.4867386, 0.5215340, -2.0], dtype=torch.float64))
    assert grad[:, 1].eq(0).all()
    assert metrics["sapo_gate_mean"].item() == pytest.approx((0.9017526 + 0.8598641 + 1.0) / 3, rel=1e-6)
    assert metrics["sapo_gate_min"].item() == pytest.approx(0.8598641, rel=1e-6)


def test_vespo_by_hand():
    # row 0: token log-ratios 0.3, -0.1 -> log w = 0.2, w = 1.22140; A = +1: k 2, lambda 3:
    #        log phi = 3 + 2 (0.2) - 3 (1.22140) = -0.26421, phi = 0.76781; l_t = -phi logp_t, grad -phi per token
    # row 1: log-ratios -0.5, -0.5 -> log w = -1, w = 0.36788; A = -1: k 3, lambda 2:
    #        log phi = 2 - 3 - 2 (0.36788) = -1.73576, phi = 0.17627; l_t = +phi logp_t, grad +phi
    # column 2 is padding (log-ratio 7 there must not enter w).
    old = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -1.5, -4.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[0.3, -0.1, 7.0], [-0.5, -0.5, 7.0]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, metrics = vespo_loss(logp, old, adv, mask)
    phi = torch.tensor([0.7678136, 0.1762664], dtype=torch.float64)
    expected = torch.stack([-phi[0] * logp[0, :2], phi[1] * logp[1, :2]]).detach()
    torch.testing.assert_close(loss[:, :2], expected)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad[:, :2], torch.stack([-phi[0].expand(2), phi[1].expand(2)]))
    assert grad[:, 2].eq(0).all() and loss[:, 2].eq(0).all()
    assert metrics["vespo_phi_mean"].item() == pytest.approx(float(phi.mean()), rel=1e-6)
    assert metrics["vespo_phi_min"].item() == pytest.approx(0.1762664, rel=1e-6)
    # The rollout correction's token weights enter w: row 0 with weights (e^0.3, 1): log w = 0.5, w = 1.64872,
    # log phi = 3 + 1 - 3 (1.64872) = -0.94616, phi = 0.38823; row 1 with (2, 1/2): log w unchanged.
    correction = torch.tensor([[math.exp(0.3), 1.0, 5.0], [2.0, 0.5, 5.0]], dtype=torch.float64)
    loss, _ = vespo_loss(logp, old, adv, mask, correction=correction)
    torch.testing.assert_close(loss[0, :2], (-0.3882275 * logp[0, :2]).detach())
    torch.testing.assert_close(loss[1, :2], expected[1])


def test_luspo_aggregation_by_hand():
    # GSPO's ratio: row 0 token log-ratios 0.2, 0.4 -> s = e^0.3 = 1.34986, A = +1, eps_high 0.28: clipped to 1.28,
    # l = -1.28 on each of its 2 tokens; row 1 one token, s = e^0.1 = 1.10517, A = -1: unclipped, l = 1.10517.
    # LUSPO (sum over each sequence's tokens, mean over sequences): (-1.28 * 2 + 1.10517) / 2 = -0.72741;
    # GSPO (seq_mean_token_mean): (-1.28 + 1.10517) / 2 = -0.08741. Gradient: row 0 clipped, 0; row 1
    # d/dlogp of (1/2) * 1 * (-A s) = s / 2 = 0.55259.
    logp = torch.tensor([[0.2, 0.4], [0.1, 5.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    token_loss, _ = policy_loss(logp, old, adv, mask, eps_high=0.28, ratio_level="sequence")
    luspo = aggregate_loss(token_loss, mask, "seq_mean_token_sum")
    assert luspo.item() == pytest.approx(-0.7274145, rel=1e-6)
    assert aggregate_loss(token_loss, mask, "seq_mean_token_mean").item() == pytest.approx(-0.0874145, rel=1e-6)
    (grad,) = torch.autograd.grad(luspo, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [0.5525855, 0.0]], dtype=torch.float64))
    # the batch's count of sequences is the normaliser when given (micro-batches add up)
    assert aggregate_loss(token_loss, mask, "seq_mean_token_sum", num_seqs=4.0).item() == pytest.approx(-0.3637073)


# ------------------------------------------------------------------------------------ plain loops, token by token
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rows(logp, old, mask):
    """Per completion: the (logp, log-ratio) of its mask tokens with their column index."""
    for i in range(len(mask)):
        yield i, [(t, logp[i][t], logp[i][t] - old[i][t]) for t in range(len(mask[i])) if mask[i][t] > 0]


def _loop_cispo(logp, old, adv, mask, cap):
    loss = [[0.0] * len(row) for row in mask]
    grad = [[0.0] * len(row) for row in mask]
    for i, tokens in _rows(logp, old, mask):
        for t, lp, lr in tokens:
            weight = min(math.exp(lr), cap)  # sg(clip(r, ., cap))
            loss[i][t], grad[i][t] = -weight * adv[i] * lp, -weight * adv[i]
    return loss, grad


def _loop_sapo(logp, old, adv, mask, tau_pos, tau_neg, level):
    loss = [[0.0] * len(row) for row in mask]
    grad = [[0.0] * len(row) for row in mask]  # of the sum of the token losses
    for i, tokens in _rows(logp, old, mask):
        tau = tau_pos if adv[i] > 0 else tau_neg
        seq_ratio = math.exp(sum(lr for _, _, lr in tokens) / max(len(tokens), 1))
        for t, _, lr in tokens:
            r = seq_ratio if level == "sequence" else math.exp(lr)
            s = _sigmoid(tau * (r - 1.0))
            loss[i][t] = -s * 4.0 / tau * adv[i]
            # token: d l_t / d logp_t; sequence: every token's loss moves with s_i, d s_i / d logp_t = s_i / |y|
            grad[i][t] = -4.0 * s * (1.0 - s) * r * adv[i]
    return loss, grad


def _loop_vespo(logp, old, adv, mask, k_pos, lam_pos, k_neg, lam_neg, correction=None):
    loss = [[0.0] * len(row) for row in mask]
    grad = [[0.0] * len(row) for row in mask]
    for i, tokens in _rows(logp, old, mask):
        log_w = sum(min(max(lr, -20.0), 20.0) for _, _, lr in tokens)
        if correction is not None:
            log_w += sum(min(max(math.log(max(correction[i][t], 1e-300)), math.log(1e-8)), 20.0) for t, _, _ in tokens)
        log_w = min(max(log_w, math.log(1e-8)), 20.0)
        k, lam = (k_pos, lam_pos) if adv[i] >= 0 else (k_neg, lam_neg)
        phi = math.exp(lam) * math.exp(log_w) ** k * math.exp(-lam * math.exp(log_w))
        for t, lp, _ in tokens:
            loss[i][t], grad[i][t] = -phi * adv[i] * lp, -phi * adv[i]
    return loss, grad


def _random_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, length = 7, 6
    old = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 3  # [N, L]
    logp = old + torch.randn(n, length, generator=gen, dtype=torch.float64) * 0.8  # ratios from ~0.1 to ~10
    lengths = torch.randint(0, length + 1, (n,), generator=gen)  # some completions are empty
    mask = (torch.arange(length) < lengths[:, None]).double()  # [N, L]
    logp = torch.where(mask > 0, logp, torch.tensor(-INF, dtype=torch.float64))  # garbage on padding
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    adv[0] = 0.0  # a group without spread
    correction = torch.rand(n, length, generator=gen, dtype=torch.float64) * 2
    correction[1, 0] = 0.0  # a masked token (token_mask)
    return logp, old, adv, mask, correction


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    "name, options, level",
    [
        ("cispo", {"max_ratio": 5.0}, "token"),
        ("cispo", {"max_ratio": 1.2}, "token"),
        ("sapo", {"tau_pos": 1.0, "tau_neg": 1.05}, "token"),
        ("sapo", {"tau_pos": 3.0, "tau_neg": 0.5}, "sequence"),
        ("vespo", {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}, "token"),
        ("vespo", {"k_pos": 0.5, "lambda_pos": 1.0, "k_neg": 5.0, "lambda_neg": 0.3}, "token"),
        ("vespo_corrected", {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}, "token"),
    ],
)
def test_vectorised_equals_plain_loop(seed, name, options, level):
    logp, old, adv, mask, correction = _random_inputs(seed)
    logp.requires_grad_(True)
    lists = logp.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    if name == "cispo":
        loss, _ = cispo_loss(logp, old, adv, mask, **options)
        expected, expected_grad = _loop_cispo(*lists, options["max_ratio"])
    elif name == "sapo":
        loss, _ = sapo_loss(logp, old, adv, mask, ratio_level=level, **options)
        expected, expected_grad = _loop_sapo(*lists, options["tau_pos"], options["tau_neg"], level)
    else:
        given = correction if name == "vespo_corrected" else None
        loss, _ = vespo_loss(logp, old, adv, mask, correction=given, **options)
        expected, expected_grad = _loop_vespo(*lists, *options.values(), None if given is None else given.tolist())
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_luspo_equals_plain_loop(seed):
    logp, old, adv, mask, _ = _random_inputs(seed)
    logp.requires_grad_(True)
    token_loss, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, ratio_level="sequence")
    luspo = aggregate_loss(token_loss, mask, "seq_mean_token_sum")
    expected, expected_grad = 0.0, [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i, tokens in _rows(logp.tolist(), old.tolist(), mask.tolist()):
        if not tokens:
            continue
        s = math.exp(sum(lr for _, _, lr in tokens) / len(tokens))  # GSPO's s_i
        a = adv[i].item()
        clipped = (a > 0 and s > 1.28) or (a < 0 and s < 0.8)
        expected += len(tokens) * -min(s * a, min(max(s, 0.8), 1.28) * a) / mask.shape[0]
        for t, _, _ in tokens:  # d/dlogp_t of |y_i| (-s_i A_i) / N = -A_i s_i / N when not clipped
            expected_grad[i][t] = 0.0 if clipped else -a * s / mask.shape[0]
    assert luspo.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    (grad,) = torch.autograd.grad(luspo, logp)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_on_policy_every_surrogate_has_grpos_gradient():
    # At r = 1 (one optimizer step per rollout, the policy's own samples) the clipped surrogate, CISPO, SAPO and
    # VESPO all give -A grad log pi per token: they differ only once the policy has moved from the sampler.
    logp, _, adv, mask, _ = _random_inputs(0)
    logp = torch.where(mask > 0, logp, torch.zeros_like(logp)).detach()
    grads = {}
    for name, options in (("clip", {}), ("cispo", {"max_ratio": 5.0}), ("sapo", {}), ("vespo", {})):
        current = logp.clone().requires_grad_(True)
        loss, _ = grpo_loss(current, logp, adv, mask, surrogate=name, surrogate_options=options)
        (grads[name],) = torch.autograd.grad(loss, current)
    expected = -adv.unsqueeze(-1) * mask / mask.sum()  # token_mean of -A log pi
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------- composition in grpo_loss
def test_correction_multiplies_the_loss_except_vespos_which_folds_it():
    logp, old, adv, mask, correction = _random_inputs(1)
    logp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    keep = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) > 0.3).double()  # a token selection
    for name, fn in (("cispo", cispo_loss), ("sapo", sapo_loss), ("clip", policy_loss)):
        loss, _ = grpo_loss(logp, old, adv, mask, surrogate=name, is_weights=keep, correction=correction)
        token_loss, _ = fn(logp, old, adv, mask, is_weights=keep * correction)
        assert loss.item() == pytest.approx(aggregate_loss(token_loss, mask).item(), rel=1e-12), name
    loss, _ = grpo_loss(logp, old, adv, mask, surrogate="vespo", is_weights=keep, correction=correction)
    token_loss, _ = vespo_loss(logp, old, adv, mask, is_weights=keep, correction=correction)
    assert loss.item() == pytest.approx(aggregate_loss(token_loss, mask).item(), rel=1e-12)
    multiplied, _ = vespo_loss(logp, old, adv, mask, is_weights=keep * correction)
    assert loss.item() != pytest.approx(aggregate_loss(multiplied, mask).item(), rel=1e-3)


def test_grpo_loss_refuses_what_a_surrogate_cannot_take():
    logp, old, adv, mask, _ = _random_inputs(2)
    with pytest.raises(ValueError, match="dual_clip caps the clipped surrogate's loss; surrogate 'sapo'"):
        grpo_loss(logp, old, adv, mask, surrogate="sapo", dual_clip=3.0)
    with pytest.raises(ValueError, match="the clipped surrogate takes eps_low, eps_high and dual_clip"):
        grpo_loss(logp, old, adv, mask, surrogate_options={"max_ratio": 5.0})
    with pytest.raises(ValueError, match="ratio_level 'sequence' is not one of this surrogate's: token"):
        grpo_loss(logp, old, adv, mask, surrogate="cispo", ratio_level="sequence")
    with pytest.raises(ValueError, match="policy-loss surrogate 'ppo'; valid names: cispo, clip, sapo, vespo"):
        grpo_loss(logp, old, adv, mask, surrogate="ppo")
    assert SURROGATES.names() == ["cispo", "clip", "sapo", "vespo"]


# ---------------------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CISPO(max_ratio=0.2), "cispo's max_ratio (the importance weight's cap) must be >= 1, got 0.2"),
        (lambda: SAPO(tau_neg=0.0), "sapo's tau_neg (the gate's temperature) must be > 0, got 0.0"),
        (lambda: SAPO(tau_pos=-1.0), "sapo's tau_pos (the gate's temperature) must be > 0, got -1.0"),
        (lambda: VESPO(k_neg=-1.0), "vespo's k_neg (the power of w) must be >= 0, got -1.0"),
        (lambda: VESPO(lambda_pos=0.0), "vespo's lambda_pos (the decay of w) must be > 0, got 0.0"),
    ],
)
def test_options_are_checked_on_construction(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_options_hand_their_numbers_to_the_loss():
    assert CISPO().options() == {"max_ratio": 5.0}
    assert SAPO().options() == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert VESPO().options() == {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}
    assert [cls.name for cls in (CISPO, SAPO, VESPO)] == ["cispo", "sapo", "vespo"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((CISPO(), "sequence", None, None, "token_mean"), "ratio_level: surrogate cispo takes ratio_level token, got"),
        ((VESPO(), "sequence", None, None, "token_mean"), "VESPO forms its own sequence weight"),
        ((None, "token", None, None, "seq_mean_token_sum"), "loss_aggregation: seq_mean_token_sum is LUSPO's"),
        ((SAPO(), "token", 3.0, None, "token_mean"), "dual_clip: it caps the clipped surrogate's loss"),
        ((VESPO(), "token", None, "sequence_mask", "token_mean"), "rollout_correction: surrogate vespo folds"),
        ((SAPO(), "token", None, None, "token_mean", KLCov()), "token_selection: kl_cov acts on the clipped"),
        ((CISPO(), "token", None, None, "token_mean", ClipCov()), "token_selection: clip_cov acts on the clipped"),
    ],
)
def test_combinations_a_surrogate_cannot_honour_are_refused(arguments, message):
    assert message in surrogate_problem(*arguments)


def test_combinations_that_compose_are_accepted():
    assert surrogate_problem(SAPO(), "sequence", None, "sequence_mask", "seq_mean_token_sum") is None
    assert surrogate_problem(VESPO(), "token", None, "token_mask", "token_mean", HighEntropyTokens()) is None
    assert surrogate_problem(None, "sequence", 3.0, "token_truncate", "seq_mean_token_sum", KLCov()) is None


def test_a_checkpoint_holding_a_surrogate_loads_with_weights_only(tmp_path):
    # GRPOModule(surrogate=SAPO(...)) built in Python keeps the object in its hyper-parameters, which a checkpoint
    # pickles; --ckpt_path reads checkpoints with torch.load(weights_only=True)
    path = tmp_path / "hparams.pt"
    torch.save({"surrogate": SAPO(tau_neg=2.0), "other": VESPO(), "third": CISPO(max_ratio=4.0)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == {"surrogate": SAPO(tau_neg=2.0), "other": VESPO(), "third": CISPO(max_ratio=4.0)}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model.surrogate", "CISPO", "--model.surrogate.max_ratio", "0.5"],
         "error: model.surrogate: cispo's max_ratio (the importance weight's cap) must be >= 1, got 0.5"),
        (["--model.surrogate", "SAPO", "--model.surrogate.tau_pos", "0"],
         "error: model.surrogate: sapo's tau_pos (the gate's temperature) must be > 0, got 0.0"),
        (["--model.surrogate", "CISPO", "--model.ratio_level", "sequence"],
         "error: model.ratio_level: surrogate cispo takes ratio_level token, got sequence"),
        (["--model.surrogate", "VESPO", "--model.rollout_correction", "sequence_mask"],
         "error: model.rollout_correction: surrogate vespo folds the correction's token weights"),
        (["--model.loss_aggregation", "seq_mean_token_sum"],
         "error: model.loss_aggregation: seq_mean_token_sum is LUSPO's"),
        (["--model.surrogate", "SAPO", "--model.dual_clip", "3"], "error: model.dual_clip: it caps the clipped"),
        (["--model.surrogate", "SAPO", "--model.token_selection", "KLCov"],
         "error: model.token_selection: kl_cov acts on the clipped surrogate"),
    ],
)  # fmt: skip
def test_refused_at_parse_time_naming_the_option(arguments, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", *arguments])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_a_surrogate_is_chosen_by_its_class_name(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    arguments = ["--model.surrogate", "SAPO", "--model.surrogate.tau_neg", "2", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", *arguments])
    assert exit_info.value.code == 0
    surrogate = yaml.safe_load(capsys.readouterr().out)["model"]["surrogate"]
    assert surrogate == {
        "class_path": "lit_gcpo.algorithms.surrogate_options.SAPO",
        "init_args": {"tau_pos": 1.0, "tau_neg": 2.0},
    }


def test_the_module_refuses_them_too():
    with pytest.raises(ValueError, match="ratio_level: surrogate vespo takes ratio_level token, got sequence"):
        GRPOModule(surrogate=VESPO(), ratio_level="sequence")
    with pytest.raises(TypeError, match=r"model\.surrogate must be a Surrogate"):
        GRPOModule(surrogate={"class_path": "SAPO"})
