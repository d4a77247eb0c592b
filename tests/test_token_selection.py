"""Token selection (METHODS.md §7): TRL's top_entropy_quantile, verl's Clip-Cov and KL-Cov, by hand and by loop."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gcpo.algorithms import token_selection
from lit_gcpo.algorithms.losses import aggregate_loss, policy_loss
from lit_gcpo.algorithms.token_selection import (
    KL_COV_SURROGATE_CLIP,
    TOKEN_SELECTIONS,
    ClipCov,
    HighEntropyTokens,
    KLCov,
    clip_cov_mask,
    high_entropy_mask,
    kl_cov_penalty,
    token_covariance,
)

# Entropies of 3 completions x 6 positions; the padding holds large values that must never be chosen.
ENTROPY = torch.tensor(
    [
        [0.10, 2.30, 0.70, 1.90, 0.00, 9.00],
        [1.20, 0.05, 2.30, 0.40, 1.50, 0.90],
        [3.10, 0.20, 8.00, 7.00, 6.00, 5.00],
    ]
)
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])

# TRL 1.16.0's GRPOTrainer.get_high_entropy_mask(entropies=ENTROPY, mask=MASK, threshold=1 - rho), run once in a
# throwaway venv (/tmp/trlvenv, trl==1.16.0 from PyPI) with a stand-in accelerator whose pad/gather are the
# identity (one process); threshold = torch.quantile of the 13 mask-token entropies printed alongside.
# By hand for rho = 0.2: sorted = 0, .05, .1, .2, .4, .7, .9, 1.2, 1.5, 1.9, 2.3, 2.3, 3.1; position 0.8 * 12 = 9.6
# -> 1.9 + 0.6 * (2.3 - 1.9) = 2.14: the two 2.3 and the 3.1 are kept. For rho = 0.5 the position is 6 -> 0.9
# exactly, and the token at 0.9 is kept (>=, ties kept).
TRL_MASKS = {
    0.2: (2.140000104904175, [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
    0.5: (0.8999999761581421, [[0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]]),
    0.3: (1.6599998474121094, [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
    1.0: (0.0, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]),
    0.05: (2.619999647140503, [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
}


@pytest.mark.parametrize("rho", sorted(TRL_MASKS))
def test_high_entropy_mask_equals_trl_top_entropy_quantile(rho: float) -> None:
    threshold, expected = TRL_MASKS[rho]
    keep, metrics = high_entropy_mask(ENTROPY, MASK, rho)
    assert keep.dtype == torch.bool
    assert keep.int().tolist() == expected
    assert metrics["entropy_threshold"].item() == threshold  # the same float32 number, bit for bit
    assert metrics["high_entropy_frac"].item() == pytest.approx(sum(map(sum, expected)) / 13, abs=1e-7)


def test_high_entropy_mask_is_global_over_ranks() -> None:
    # Rank 0 holds completion 0, rank 1 completions 1 and 2; gather concatenates both ranks' mask-token entropies,
    # so each rank keeps exactly its rows of the one-process mask.
    parts = [(ENTROPY[:1], MASK[:1]), (ENTROPY[1:], MASK[1:])]
    everything = torch.cat([e[m > 0] for e, m in parts])
    for rho in (0.2, 0.5):
        full, _ = high_entropy_mask(ENTROPY, MASK, rho)
        rank0, _ = high_entropy_mask(*parts[0], rho, gather=lambda values: everything)
        rank1, _ = high_entropy_mask(*parts[1], rho, gather=lambda values: everything)
        assert torch.equal(torch.cat([rank0, rank1]), full)
    # Without the gather, rank 1 alone thresholds at its own median: its 8 values sorted .05 .2 .4 .9 1.2 1.5 2.3
    # 3.1, position 3.5 -> 0.9 + 0.5 * 0.3 = 1.05, which drops the token at 0.9 that the global threshold keeps.
    alone, metrics = high_entropy_mask(*parts[1], 0.5)
    assert metrics["entropy_threshold"].item() == pytest.approx(1.05, abs=1e-6)
    assert alone.int().tolist() == [[1, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]]


def test_high_entropy_mask_sort_path_equals_torch_quantile(monkeypatch: pytest.MonkeyPatch) -> None:
    # Beyond 2**24 values torch.quantile refuses; the sort-based path must give the very same threshold.
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        entropy = torch.rand(5, 13, generator=generator) * 3
        if trial % 2:
            entropy = (entropy * 4).round() / 4  # many ties
        mask = (torch.rand(5, 13, generator=generator) > 0.3).long()
        rho = float(torch.rand((), generator=generator)) * 0.9 + 0.05
        expected, expected_metrics = high_entropy_mask(entropy, mask, rho)
        monkeypatch.setattr(token_selection, "QUANTILE_MAX_ELEMENTS", 0)
        got, metrics = high_entropy_mask(entropy, mask, rho)
        monkeypatch.undo()
        assert torch.equal(got, expected)
        assert torch.equal(metrics["entropy_threshold"], expected_metrics["entropy_threshold"])


def test_high_entropy_mask_composes_with_policy_loss_as_trl() -> None:
    # On-policy (ratio 1) the token loss is -A. A = (1, -2, 0.5); rho = 0.2 keeps (0, 1), (1, 2), (2, 0):
    # -1 + 2 - 0.5 = 0.5 over all 13 mask tokens (TRL keeps the normaliser) = 0.0384615.
    logp = torch.full((3, 6), -1.0)
    keep, _ = high_entropy_mask(ENTROPY, MASK, 0.2)
    token_loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -2.0, 0.5]), MASK)
    loss = aggregate_loss(token_loss * keep, MASK, "token_mean")
    assert loss.item() == pytest.approx(0.5 / 13, abs=1e-7)


def test_high_entropy_mask_empty_batch_keeps_nothing() -> None:
    keep, metrics = high_entropy_mask(ENTROPY, torch.zeros_like(MASK), 0.2)
    assert not keep.any() and metrics["entropy_threshold"].item() == 0.0


# A small case for Clip-Cov and KL-Cov. A = (2, -2), every token is a completion token (6 of them). The losses
# derived below were also obtained by executing verl's own compute_policy_loss_clip_cov / _kl_cov (volcengine/verl
# b178a3c, token-mean aggregation, stub config) once on these inputs in a throwaway script: 0.266667 for Clip-Cov,
# -0.152043 (ratio 2e-4) and -0.135376 (ratio 0.34) for KL-Cov.
# mean A (token-weighted) = 0; mean log pi = (0 - 4 - 1 - 2.5 - 1 + 0) / 6 = -8.5 / 6 = -1.416667.
# Cov = (A - 0)(log pi + 1.416667):
#   row 0: 2 * 1.416667 = 2.833333, 2 * (-2.583333) = -5.166667, 2 * 0.416667 = 0.833333
#   row 1: -2 * (-1.083333) = 2.166667, -2 * 0.416667 = -0.833333, -2 * 1.416667 = -2.833333
ADV = torch.tensor([2.0, -2.0])
LOGP = torch.tensor([[0.0, -4.0, -1.0], [-2.5, -1.0, 0.0]], dtype=torch.float64)
FULL = torch.ones(2, 3, dtype=torch.long)
COV = [[17 / 6, -31 / 6, 5 / 6], [13 / 6, -5 / 6, -17 / 6]]


def test_token_covariance_by_hand_and_over_ranks() -> None:
    torch.testing.assert_close(token_covariance(LOGP, ADV, FULL), torch.tensor(COV, dtype=torch.float64))
    # Two ranks, one row each: reduce sums both ranks' (sum A, sum log pi, count), giving the global means.
    local: list[torch.Tensor] = []
    for row in range(2):
        token_covariance(LOGP[row : row + 1], ADV[row : row + 1], FULL[:1], lambda t: local.append(t) or t)
    for row in range(2):
        other = local[1 - row]
        cov = token_covariance(LOGP[row : row + 1], ADV[row : row + 1], FULL[:1], lambda t, other=other: t + other)
        torch.testing.assert_close(cov[0], torch.tensor(COV[row], dtype=torch.float64))
    # Padding neither enters the means nor gets a covariance.
    padded = torch.cat([LOGP, torch.full((2, 1), -50.0, dtype=torch.float64)], dim=1)
    cov_padded = token_covariance(padded, ADV, torch.cat([FULL, torch.zeros(2, 1, dtype=torch.long)], dim=1))
    torch.testing.assert_close(cov_padded[:, :3], torch.tensor(COV, dtype=torch.float64))
    assert cov_padded[:, 3].abs().max().item() == 0.0


def test_clip_cov_by_hand() -> None:
    # Band (1, 5), open: eligible by covariance are (0, 0) 2.83 and (1, 0) 2.17 ((0, 2) at 0.83 is not).
    # Token (1, 0) is made PPO-clipped: old = log pi + 0.5, ratio = e^-0.5 = 0.607 < 0.8 with A < 0, the clipped
    # surrogate 2 * 0.8 = 1.6 > 2 * 0.607: verl leaves it out, so only (0, 0) is eligible.
    # ratio 2e-4: max(int(2e-4 * 6), 1) = 1 token detached -> (0, 0), whatever the generator.
    old = LOGP.clone()
    old[1, 0] += 0.5
    keep, metrics = clip_cov_mask(LOGP, old, ADV, FULL, generator=torch.Generator().manual_seed(0))
    assert keep.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert metrics["clip_cov_frac"].item() == pytest.approx(1 / 6, abs=1e-7)
    assert metrics["clip_cov_eligible_frac"].item() == pytest.approx(1 / 6, abs=1e-7)
    # verl's loss: max(-A r, -A clip(r)) * keep, token-mean: row 0 (r = 1): 0 - 2 - 2; row 1: 1.6 + 2 + 2 -> 1.6 / 6.
    token_loss, _ = policy_loss(LOGP, old, ADV, FULL)
    assert aggregate_loss(token_loss * keep, FULL, "token_mean").item() == pytest.approx(1.6 / 6, abs=1e-12)
    # With both eligible (no clipped token) and a budget of int(0.34 * 6) = 2, both are detached.
    both, _ = clip_cov_mask(LOGP, LOGP, ADV, FULL, generator=torch.Generator().manual_seed(0), ratio=0.34)
    assert both.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    # A narrower band (2.5, 5) leaves (0, 0) only.
    narrow, _ = clip_cov_mask(LOGP, LOGP, ADV, FULL, generator=torch.Generator().manual_seed(0), ratio=0.34, lb=2.5)
    assert narrow.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_clip_cov_band_is_open() -> None:
    # A = (1, -1), log pi = [[0, -2], [-2, 0]]: means 0 and -1, Cov = [[1, -1], [1, -1]] exactly. verl's band is
    # open (lb < Cov < ub): with lb = 1 (the default) or ub = 1, no token is eligible and none is detached.
    logp = torch.tensor([[0.0, -2.0], [-2.0, 0.0]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    assert token_covariance(logp, adv, mask).tolist() == [[1.0, -1.0], [1.0, -1.0]]
    for lb, ub in ((1.0, 5.0), (0.5, 1.0)):
        keep, metrics = clip_cov_mask(logp, logp, adv, mask, generator=torch.Generator(), ratio=1.0, lb=lb, ub=ub)
        assert keep.tolist() == [[1.0, 1.0], [1.0, 1.0]] and metrics["clip_cov_eligible_frac"].item() == 0.0
    keep, _ = clip_cov_mask(logp, logp, adv, mask, generator=torch.Generator(), ratio=1.0, lb=0.5, ub=1.5)
    assert keep.tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_clip_cov_random_choice_is_seeded_and_uniform_over_the_eligible() -> None:
    # Two eligible tokens, budget int(0.2 * 6) = 1: the seed decides which; the same seed gives the same one.
    def chosen(seed: int) -> tuple[int, int]:
        keep, _ = clip_cov_mask(LOGP, LOGP, ADV, FULL, generator=torch.Generator().manual_seed(seed), ratio=0.2)
        (row, col) = (keep == 0).nonzero().tolist()[0]
        assert (keep == 0).sum().item() == 1
        return row, col

    picks = [chosen(seed) for seed in range(40)]
    assert picks == [chosen(seed) for seed in range(40)]
    assert set(picks) == {(0, 0), (1, 0)}
    assert 10 <= picks.count((0, 0)) <= 30  # a fair choice: Binomial(40, 1/2) lies here with prob > 0.998


@pytest.mark.parametrize("seed", range(4))
def test_clip_cov_matches_a_plain_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 8, generator=generator, dtype=torch.float64) * 4
    old = logp + (torch.rand(6, 8, generator=generator, dtype=torch.float64) - 0.5) * 0.8
    adv = torch.randn(6, generator=generator, dtype=torch.float64) * 2
    mask = (torch.rand(6, 8, generator=generator) > 0.2).long()
    lb, ub, ratio = 0.3, 3.0, 0.1
    keep, _ = clip_cov_mask(
        logp, old, adv, mask, generator=torch.Generator().manual_seed(seed), ratio=ratio, lb=lb, ub=ub
    )
    tokens = [(i, t) for i in range(6) for t in range(8) if mask[i, t]]
    mean_a = sum(adv[i].item() for i, _ in tokens) / len(tokens)
    mean_lp = sum(logp[i, t].item() for i, t in tokens) / len(tokens)
    eligible = []
    for i, t in tokens:  # row-major, as verl's nonzero
        r = math.exp(logp[i, t].item() - old[i, t].item())
        a = adv[i].item()
        clipped = -a * min(max(r, 0.8), 1.2) > -a * r
        cov = (a - mean_a) * (logp[i, t].item() - mean_lp)
        if not clipped and lb < cov < ub:
            eligible.append((i, t))
    budget = max(int(ratio * len(tokens)), 1)
    order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed)).tolist()
    expected = {eligible[k] for k in order[:budget]}
    assert {tuple(x) for x in (keep == 0).nonzero().tolist()} == expected
    assert len(expected) == min(budget, len(eligible)) > 0


def test_kl_cov_by_hand_composes_with_the_unclipped_surrogate() -> None:
    # Top-k by covariance: k = max(int(2e-4 * 6), 1) = 1 -> (0, 0) (2.83); k = int(0.34 * 6) = 2 -> (0, 0), (1, 0).
    # old = log pi except (0, 0): old = log pi - 0.3 (|kl| 0.3) and (1, 0): old = log pi + 0.2 (|kl| 0.2).
    # coef 0.5 -> penalties 0.15 and 0.1.
    old = LOGP.clone()
    old[0, 0] -= 0.3
    old[1, 0] += 0.2
    logp = LOGP.clone().requires_grad_(True)
    penalty, metrics = kl_cov_penalty(logp, old, ADV, FULL, coef=0.5)
    torch.testing.assert_close(penalty.detach(), torch.tensor([[0.15, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert metrics["kl_cov_frac"].item() == pytest.approx(1 / 6, abs=1e-7)
    assert metrics["kl_cov_abs_kl"].item() == pytest.approx(0.5 / 6, abs=1e-7)
    penalty, _ = kl_cov_penalty(logp, old, ADV, FULL, coef=0.5, ratio=0.34)
    torch.testing.assert_close(penalty.detach(), torch.tensor([[0.15, 0, 0], [0.1, 0, 0]], dtype=torch.float64))
    # verl's KL-Cov loss, token-mean, unclipped -A r: row 0: -2 e^0.3 - 2 - 2; row 1: 2 e^-0.2 + 2 + 2;
    # plus 0.15 + 0.1: (-2.699718 - 4 + 1.637462 + 4 + 0.25) / 6 = -0.135376.
    token_loss, _ = policy_loss(logp, old, ADV, FULL, eps_low=KL_COV_SURROGATE_CLIP, eps_high=KL_COV_SURROGATE_CLIP)
    loss = aggregate_loss(token_loss + penalty, FULL, "token_mean")
    expected = (-2 * math.exp(0.3) - 4 + 2 * math.exp(-0.2) + 4 + 0.25) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # With k = 1 only the 0.15 penalty remains: (... + 0.15) / 6 = -0.152043.
    penalty_one, _ = kl_cov_penalty(logp, old, ADV, FULL, coef=0.5)
    loss_one = aggregate_loss(token_loss + penalty_one, FULL, "token_mean")
    assert loss_one.item() == pytest.approx(expected - 0.1 / 6, abs=1e-12)
    assert loss_one.item() == pytest.approx(-0.152043, abs=1e-6)
    # The penalty carries the gradient: d/d log pi(0, 0) = (-2 e^0.3 + 0.5 sign(0.3)) / 6 and
    # d/d log pi(1, 0) = (2 e^-0.2 + 0.5 sign(-0.2)) / 6 = (1.637462 - 0.5) / 6.
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx((-2 * math.exp(0.3) + 0.5) / 6, abs=1e-12)
    assert logp.grad[1, 0].item() == pytest.approx((2 * math.exp(-0.2) - 0.5) / 6, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_kl_cov_matches_a_plain_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(5, 7, generator=generator, dtype=torch.float64) * 4
    old = logp + (torch.rand(5, 7, generator=generator, dtype=torch.float64) - 0.5)
    adv = torch.randn(5, generator=generator, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=generator) > 0.3).long()
    penalty, _ = kl_cov_penalty(logp, old, adv, mask, ratio=0.15, coef=2.0)
    tokens = [(i, t) for i in range(5) for t in range(7) if mask[i, t]]
    mean_a = sum(adv[i].item() for i, _ in tokens) / len(tokens)
    mean_lp = sum(logp[i, t].item() for i, t in tokens) / len(tokens)
    ranked = sorted(tokens, key=lambda it: -(adv[it[0]].item() - mean_a) * (logp[it].item() - mean_lp))
    top = set(ranked[: max(int(0.15 * len(tokens)), 1)])
    for i in range(5):
        for t in range(7):
            expected = 2.0 * abs(logp[i, t].item() - old[i, t].item()) if (i, t) in top else 0.0
            assert penalty[i, t].item() == pytest.approx(expected, abs=1e-12)


def test_kl_cov_without_tokens_penalises_nothing() -> None:
    penalty, metrics = kl_cov_penalty(LOGP, LOGP - 1.0, ADV, torch.zeros_like(FULL))
    assert penalty.abs().max().item() == 0.0 and metrics["kl_cov_frac"].item() == 0.0


def test_options_are_refused_at_construction_naming_the_option() -> None:
    assert TOKEN_SELECTIONS.names() == ["clip_cov", "high_entropy_tokens", "kl_cov"]
    assert HighEntropyTokens(rho=1.0).rho == 1.0
    for rho in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"rho \(top_entropy_quantile\) in \(0, 1\]"):
            HighEntropyTokens(rho=rho)
    with pytest.raises(ValueError, match="rho"):
        high_entropy_mask(ENTROPY, MASK, 0.0)
    with pytest.raises(ValueError, match="lb < ub"):
        ClipCov(lb=5.0, ub=1.0)
    with pytest.raises(ValueError, match="lb < ub"):
        ClipCov(lb=2.0, ub=2.0)
    with pytest.raises(ValueError, match="clip_cov's ratio"):
        ClipCov(ratio=0.0)
    with pytest.raises(ValueError, match="kl_cov's ratio"):
        KLCov(ratio=1.5)
    with pytest.raises(ValueError, match="kl_cov's coef"):
        KLCov(coef=-0.1)
    with pytest.raises(ValueError, match="lb < ub"):
        clip_cov_mask(LOGP, LOGP, ADV, FULL, generator=torch.Generator(), lb=3.0, ub=1.0)


@pytest.mark.parametrize(
    "selection", [HighEntropyTokens(rho=0.3), ClipCov(ratio=0.01, lb=-0.5, ub=2.0), KLCov(ratio=0.01)]
)
def test_a_python_built_modules_checkpoint_loads_with_weights_only(selection, tmp_path) -> None:
    """GRPOModule(token_selection=...) built in Python (a Lightning project of one's own) keeps the object in its
    hyper-parameters; Lightning reads a checkpoint with torch.load(weights_only=True), which refused the class."""
    import lightning as L

    from lit_gcpo.training.module import GRPOModule

    saved = GRPOModule(model="lit-gcpo/tiny-arith", token_selection=selection, export_dir=None)
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    checkpoint["pytorch-lightning_version"] = L.__version__
    torch.save(checkpoint, tmp_path / "python.ckpt")
    restored = GRPOModule.load_from_checkpoint(tmp_path / "python.ckpt", export_dir=None)
    assert type(restored.hparams.token_selection) is type(selection) and restored.hparams.token_selection == selection
