"""Rollout correction (TRL 1.16's ``vllm_importance_sampling_mode``) and the off-policy sequence mask
(DeepSeek-V3.2; TRL's ``off_policy_mask_threshold``): hand-derived values, a plain-loop reference, and TRL's
own numbers on the same inputs."""

from __future__ import annotations

import dataclasses
import math
import random

import lightning as L
import pytest
import torch
from test_training import CaptureBatches, make_pair, trainer

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.losses import grpo_loss
from lit_gcpo.algorithms.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    off_policy_sequence_mask,
    rollout_correction_problem,
    rollout_correction_weights,
)
from lit_gcpo.running.cli import main
from lit_gcpo.training.module import GRPOModule

NAN = float("nan")
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# Three completions of 4, 3 and 2 tokens. The trainer's old log-probs and d = old_trainer - old_engine:
#   row 0: d = [ 0.1,  1.0, -0.5,  0.3]
#   row 1: d = [-1.2,  0.2, -0.8 | pad]
#   row 2: d = [ 0.6,  0.7 | pad,  pad]
# The engine's padding holds NaN (it must not matter); the trainer's holds -9.
TRAINER = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.3, -1.2, -2.0, -9.0], [-0.7, -0.4, -9.0, -9.0]])
D = torch.tensor([[0.1, 1.0, -0.5, 0.3], [-1.2, 0.2, -0.8, 0.0], [0.6, 0.7, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
ENGINE = torch.where(MASK > 0, TRAINER - D, torch.full_like(TRAINER, NAN))
# The current policy (for the PPO ratio and the off-policy mask) has moved by E from the trainer's old log-probs.
E = torch.tensor([[0.3, -0.1, 0.25, 0.0], [0.05, -0.3, 0.2, 0.0], [0.1, 0.4, 0.0, 0.0]])
CURRENT = TRAINER + E
ADV = torch.tensor([1.0, -1.0, -0.5])

# Token ratios exp(d):
#   row 0: e^0.1 = 1.1051709, e^1 = 2.7182818, e^-0.5 = 0.6065307, e^0.3 = 1.3498588
#   row 1: e^-1.2 = 0.3011942, e^0.2 = 1.2214028, e^-0.8 = 0.4493290
#   row 2: e^0.6 = 1.8221188, e^0.7 = 2.0137527
# Sequence ratios exp(sum d) (a sum, not a mean): e^0.9 = 2.4596031, e^-1.8 = 0.1652989, e^1.3 = 3.6692967.
# With C_min = 0.5, C_max = 2.5: outside are tokens (0, 1) above, (1, 0) and (1, 2) below: 3 of 9 tokens, in
# rows 0 and 1 (2 of 3 sequences); sequences 1 (below) and 2 (above): 5 of 9 tokens, 2 of 3 sequences.
T = [math.exp(v) for v in (0.1, 1.0, -0.5, 0.3, -1.2, 0.2, -0.8, 0.6, 0.7)]
S0 = math.exp(0.9)
EXPECTED_WEIGHTS = {
    # clamp each token ratio to [0.5, 2.5]; padding 1
    "token_truncate": [[T[0], 2.5, T[2], T[3]], [0.5, T[5], 0.5, 1.0], [T[7], T[8], 1.0, 1.0]],
    # the three outside tokens become 0
    "token_mask": [[T[0], 0.0, T[2], T[3]], [0.0, T[5], 0.0, 1.0], [T[7], T[8], 1.0, 1.0]],
    # row 0 keeps e^0.9, row 1 is raised to 0.5, row 2 lowered to 2.5, on every token of the row
    "sequence_truncate": [[S0] * 4, [0.5, 0.5, 0.5, 1.0], [2.5, 2.5, 1.0, 1.0]],
    # rows 1 and 2 are outside: 0 on all their tokens
    "sequence_mask": [[S0] * 4, [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
}
EXPECTED_SHARES = {  # (token share, sequence share) outside the bounds
    "token_truncate": (3 / 9, 2 / 3),
    "token_mask": (3 / 9, 2 / 3),
    "sequence_truncate": (5 / 9, 2 / 3),
    "sequence_mask": (5 / 9, 2 / 3),
}
EXPECTED_RATIO_STATS = {  # (min, mean, max) of the bounded ratio: over the 9 tokens, or the 3 sequences
    "token_truncate": (0.5, (T[0] + 2.5 + T[2] + T[3] + 0.5 + T[5] + 0.5 + T[7] + T[8]) / 9, 2.5),
    "token_mask": (0.0, (T[0] + T[2] + T[3] + T[5] + T[7] + T[8]) / 9, T[8]),
    "sequence_truncate": (0.5, (S0 + 0.5 + 2.5) / 3, 2.5),
    "sequence_mask": (0.0, S0 / 3, S0),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_by_hand(mode):
    weights, metrics = rollout_correction_weights(TRAINER, ENGINE, MASK, mode, c_min=0.5, c_max=2.5)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED_WEIGHTS[mode]), rtol=1e-6, atol=1e-7)
    kind = "masked" if mode.endswith("mask") else "truncated"
    token_share, seq_share = EXPECTED_SHARES[mode]
    assert metrics[f"correction_{kind}_token_frac"].item() == pytest.approx(token_share, rel=1e-6)
    assert metrics[f"correction_{kind}_seq_frac"].item() == pytest.approx(seq_share, rel=1e-6)
    other = "truncated" if kind == "masked" else "masked"
    assert f"correction_{other}_token_frac" not in metrics
    low, mean, high = EXPECTED_RATIO_STATS[mode]
    assert metrics["correction_ratio_min"].item() == pytest.approx(low, rel=1e-6)
    assert metrics["correction_ratio_mean"].item() == pytest.approx(mean, rel=1e-6)
    assert metrics["correction_ratio_max"].item() == pytest.approx(high, rel=1e-6)
    # |d| over the 9 tokens: (0.1 + 1 + 0.5 + 0.3 + 1.2 + 0.2 + 0.8 + 0.6 + 0.7) / 9 = 5.4 / 9 = 0.6; max 1.2
    assert metrics["mismatch_abs_mean"].item() == pytest.approx(0.6, rel=1e-6)
    assert metrics["mismatch_abs_max"].item() == pytest.approx(1.2, rel=1e-6)


def test_masked_tokens_add_zero_but_stay_in_the_normaliser():
    # On-policy (PPO ratio 1), A = [1, -1, -0.5], token_mean: loss = -sum_t m A w / 9, the 9 tokens of all rows.
    # token_mask weights: row 0: 1.10517 + 0 + 0.60653 + 1.34986 = 3.06156 (times A = 1: -3.06156);
    # row 1: 0 + 1.22140 + 0 (times -1: +1.22140); row 2: 1.82212 + 2.01375 = 3.83587 (times -0.5: +1.91793).
    # Loss = (-3.06156 + 1.22140 + 1.91793) / 9 = 0.07777 / 9 = 0.0086411: masking zeroes a token's term, it
    # does not drop it from the 9 (dropping would divide by 6).
    weights, _ = rollout_correction_weights(TRAINER, ENGINE, MASK, "token_mask", c_min=0.5, c_max=2.5)
    loss, _ = grpo_loss(TRAINER, TRAINER, ADV, MASK, is_weights=weights)
    expected = (-(T[0] + T[2] + T[3]) + T[5] + 0.5 * (T[7] + T[8])) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_bounds_are_inside_and_none_is_no_bound():
    # One row, d = [0, ln 4 + 0.5, -3]: ratios 1 (exactly), 4 e^0.5 = 6.5949, e^-3 = 0.049787.
    trainer = torch.zeros(1, 3)
    engine = torch.tensor([[0.0, -(math.log(4.0) + 0.5), 3.0]])
    mask = torch.ones(1, 3)
    big, small = 4 * math.exp(0.5), math.exp(-3)
    # A ratio equal to a bound is inside: 1 is kept by [1, 2] and by [0.5, 1]
    for bounds in ((1.0, 2.0), (0.5, 1.0)):
        weights, _ = rollout_correction_weights(trainer, engine, mask, "token_mask", *bounds)
        assert weights[0, 0].item() == 1.0
    # C_min None: nothing is too small (e^-3 kept); C_max None: nothing too large (6.59 kept)
    weights, metrics = rollout_correction_weights(trainer, engine, mask, "token_mask", None, 2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, small]]), rtol=1e-6, atol=0)
    assert metrics["correction_masked_token_frac"].item() == pytest.approx(1 / 3)
    weights, _ = rollout_correction_weights(trainer, engine, mask, "token_mask", 0.1, None)
    torch.testing.assert_close(weights, torch.tensor([[1.0, big, 0.0]]), rtol=1e-6, atol=0)
    weights, _ = rollout_correction_weights(trainer, engine, mask, "token_mask", None, None)
    torch.testing.assert_close(weights, torch.tensor([[1.0, big, small]]), rtol=1e-6, atol=0)
    # truncation with one bound leaves the other side alone; a clamped ratio is the bound itself
    weights, _ = rollout_correction_weights(trainer, engine, mask, "token_truncate", None, 2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, small]]), rtol=1e-6, atol=0)
    assert weights[0, 1].item() == 2.0
    weights, _ = rollout_correction_weights(trainer, engine, mask, "token_truncate", 0.5, None)
    torch.testing.assert_close(weights, torch.tensor([[1.0, big, 0.5]]), rtol=1e-6, atol=0)
    # A sequence ratio that overflows float32 (exp(200) = inf) is clamped to C_max, or masked
    long_gap = torch.full((1, 3), -100.0)
    weights, _ = rollout_correction_weights(trainer[:, :2], long_gap[:, :2], mask[:, :2], "sequence_truncate")
    assert weights.tolist() == [[2.0, 2.0]]
    weights, _ = rollout_correction_weights(trainer[:, :2], long_gap[:, :2], mask[:, :2], "sequence_mask")
    assert weights.tolist() == [[0.0, 0.0]]


def test_a_token_the_engine_could_not_score_is_not_corrected():
    # Row 0: d = [0.5, NaN (engine), 0.25]. TRL counts the NaN as d = 0: token weight 1, sequence ratio
    # exp(0.5 + 0.25) = e^0.75 = 2.117; the mismatch metrics leave it out: mean (0.5 + 0.25) / 2 = 0.375.
    trainer = torch.zeros(1, 3)
    engine = torch.tensor([[-0.5, NAN, -0.25]])
    mask = torch.ones(1, 3)
    weights, metrics = rollout_correction_weights(trainer, engine, mask, "token_truncate", None, 3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), 1.0, math.exp(0.25)]]), rtol=1e-6, atol=0)
    assert metrics["mismatch_abs_mean"].item() == pytest.approx(0.375)
    assert metrics["mismatch_abs_max"].item() == pytest.approx(0.5)
    weights, _ = rollout_correction_weights(trainer, engine, mask, "sequence_truncate", None, 3.0)
    torch.testing.assert_close(weights, torch.full((1, 3), math.exp(0.75)), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("mode", "c_min", "c_max", "message"),
    [
        ("token_clip", None, 2.0, "unknown mode 'token_clip'; valid names: sequence_mask, sequence_truncate"),
        ("token_mask", 2.0, 2.0, r"rollout_correction_min \(2.0\) must be less than rollout_correction_max"),
        ("sequence_mask", 3.0, 2.0, r"rollout_correction_min \(3.0\) must be less"),
        ("token_truncate", None, None, "truncates, so it needs C_min or C_max"),
        ("sequence_truncate", -0.1, 2.0, "rollout_correction_min must be >= 0"),
        ("sequence_mask", None, 0.0, "rollout_correction_max must be > 0"),
    ],
)
def test_invalid_settings_are_refused(mode, c_min, c_max, message):
    assert rollout_correction_problem(mode, c_min, c_max) is not None
    with pytest.raises(ValueError, match=message):
        rollout_correction_weights(TRAINER, ENGINE, MASK, mode, c_min, c_max)


def test_valid_settings_pass_the_check():
    assert rollout_correction_problem(None, 3.0, 1.0) is None  # correction off: nothing to check
    assert rollout_correction_problem("sequence_mask", None, None) is None  # TRL allows an unbounded mask mode
    assert rollout_correction_problem("token_truncate", 0.0, None) is None
    assert ROLLOUT_CORRECTIONS.names() == sorted(MODES)


# Off-policy mask, delta = 0.5. Five rows of 2 tokens (row 4 has one and a padding token) with
# behaviour - current = k per token, so KL_i = mean = k_i:
#   row 0: A = +1,   KL 2.0  -> kept (positive advantage)
#   row 1: A = -1,   KL 0.75 -> DROPPED (negative advantage, KL > delta)
#   row 2: A = -1,   KL 0.5  -> kept (KL = delta: the bound is inside)
#   row 3: A = 0,    KL 2.0  -> kept (A >= 0)
#   row 4: A = -0.5, KL -1.0 (one token; the padding's gap of 50 must not count) -> kept
OFF_KL = torch.tensor([[2.0, 2.0], [0.5, 1.0], [0.25, 0.75], [2.0, 2.0], [-1.0, 50.0]])
OFF_MASK = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
OFF_ADV = torch.tensor([1.0, -1.0, -1.0, 0.0, -0.5])
OFF_LOGP = torch.full((5, 2), -1.0)


def test_off_policy_mask_by_hand():
    keep, metrics = off_policy_sequence_mask(OFF_LOGP, OFF_LOGP + OFF_KL, OFF_ADV, OFF_MASK, 0.5)
    assert keep.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert metrics["off_policy_masked_seq_frac"].item() == pytest.approx(1 / 5)
    assert metrics["off_policy_masked_token_frac"].item() == pytest.approx(2 / 9)  # row 1's 2 of 9 tokens
    # KL over the 9 tokens: (4 + 1.5 + 1 + 4 - 1) / 9 = 9.5 / 9; the largest sequence KL is 2
    assert metrics["off_policy_kl_mean"].item() == pytest.approx(9.5 / 9, rel=1e-6)
    assert metrics["off_policy_kl_max"].item() == pytest.approx(2.0)
    # shares of given (batch) counts, so that micro-batches add up
    kl_logp = OFF_LOGP + OFF_KL
    _, metrics = off_policy_sequence_mask(OFF_LOGP, kl_logp, OFF_ADV, OFF_MASK, 0.5, num_tokens=18, num_seqs=10)
    assert metrics["off_policy_masked_seq_frac"].item() == pytest.approx(1 / 10)
    assert metrics["off_policy_masked_token_frac"].item() == pytest.approx(2 / 18)
    # a larger delta keeps row 1 too
    keep, _ = off_policy_sequence_mask(OFF_LOGP, OFF_LOGP + OFF_KL, OFF_ADV, OFF_MASK, 0.75)
    assert keep.tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="off_policy_mask_threshold must be > 0"):
        off_policy_sequence_mask(OFF_LOGP, OFF_LOGP, OFF_ADV, OFF_MASK, 0.0)


def test_off_policy_mask_in_the_loss():
    # On-policy PPO ratio 1, token_mean over the 9 tokens: token loss -A. Without the mask:
    # -(2 * 1 + 2 * (-1) + 2 * (-1) + 0 + 1 * (-0.5)) / 9 = 2.5 / 9. Row 1 dropped: its +2 leaves the sum but
    # its tokens stay in the normaliser: 0.5 / 9. The behaviour log-probs are given apart from old_logp ...
    logp = OFF_LOGP.clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        logp, OFF_LOGP, OFF_ADV, OFF_MASK, off_policy_threshold=0.5, behaviour_logp=OFF_LOGP + OFF_KL
    )
    assert loss.item() == pytest.approx(0.5 / 9, rel=1e-6)
    assert metrics["off_policy_masked_seq_frac"].item() == pytest.approx(1 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[1].abs().sum().item() == 0.0 and grad[2].abs().sum().item() > 0  # row 1 gets no gradient
    # ... and default to old_logp (TRL's fallback when no engine log-probs exist): here KL 0, nothing dropped
    loss, metrics = grpo_loss(OFF_LOGP, OFF_LOGP, OFF_ADV, OFF_MASK, off_policy_threshold=0.5)
    assert loss.item() == pytest.approx(2.5 / 9, rel=1e-6)
    assert metrics["off_policy_masked_seq_frac"].item() == 0.0


def _loop_weights(trainer, engine, mask, mode, c_min, c_max):
    """Plain-Python reading of TRL 1.16's rule, one token at a time (float64)."""
    level, constraint = mode.split("_")
    rows = []
    for i in range(len(trainer)):
        d = [
            0.0 if math.isnan(trainer[i][t] - engine[i][t]) else trainer[i][t] - engine[i][t]
            for t in range(len(trainer[i]))
            if mask[i][t] > 0
        ]
        ratios = [math.exp(sum(d))] * len(d) if level == "sequence" else [math.exp(x) for x in d]
        bounded = []
        for r in ratios:
            outside = (c_min is not None and r < c_min) or (c_max is not None and r > c_max)
            if constraint == "mask":
                bounded.append(0.0 if outside else r)
                continue
            if c_min is not None and r < c_min:
                r = c_min
            if c_max is not None and r > c_max:
                r = c_max
            bounded.append(r)
        it = iter(bounded)
        rows.append([next(it) if mask[i][t] > 0 else 1.0 for t in range(len(trainer[i]))])
    return rows


def _loop_keep(logp, behaviour, adv, mask, threshold):
    keep = []
    for i in range(len(logp)):
        gaps = [behaviour[i][t] - logp[i][t] for t in range(len(logp[i])) if mask[i][t] > 0]
        kl = sum(0.0 if math.isnan(g) else g for g in gaps) / max(len(gaps), 1)
        keep.append(1.0 if adv[i] >= 0 or kl <= threshold else 0.0)
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_plain_loop(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, length = 9, 7
    trainer = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 3
    engine = trainer - torch.randn(n, length, generator=gen, dtype=torch.float64) * 0.4
    engine[torch.rand(n, length, generator=gen) < 0.05] = NAN  # tokens the engine could not score
    lengths = torch.randint(0, length + 1, (n,), generator=gen)  # some completions are empty
    mask = (torch.arange(length) < lengths[:, None]).double()  # [N, L]
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    current = trainer + torch.randn(n, length, generator=gen, dtype=torch.float64) * 0.5
    lists = trainer.tolist(), engine.tolist(), mask.tolist()
    for mode in MODES:
        c_min = rng.choice([None, 0.5, 0.8])
        c_max = rng.choice([1.3, 2.0, None] if mode.endswith("mask") or c_min is not None else [1.3, 2.0])
        weights, _ = rollout_correction_weights(trainer, engine, mask, mode, c_min, c_max)
        expected = torch.tensor(_loop_weights(*lists, mode, c_min, c_max), dtype=torch.float64)
        torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12, msg=f"{mode} {c_min} {c_max}")
    threshold = rng.choice([0.05, 0.2, 0.5])
    keep, _ = off_policy_sequence_mask(current, engine, adv, mask, threshold)
    assert keep.tolist() == _loop_keep(current.tolist(), engine.tolist(), adv.tolist(), mask.tolist(), threshold)


# TRL 1.16.0's own code on the inputs above (TRAINER, ENGINE with its padding 0 as TRL pads, MASK, CURRENT, ADV),
# run once on 2026-12-06 in a throwaway venv (trl 1.16.0 wheel, torch 2.13.0 CPU): the importance-ratio block of
# GRPOTrainer._generate_and_score_completions executed from its source with C_min 0.5 and C_max 2.5, then
# GRPOTrainer._compute_loss (the model's log-probs replaced by CURRENT, epsilon 0.2, beta 0, importance_sampling_level
# token, one accumulation step, max_completion_length 4) for loss_type grpo / bnpo / dr_grpo, without and with
# off_policy_mask_threshold 0.5; the gradient is d loss / d CURRENT for grpo with the threshold.
TRL_RATIOS = {
    "token_truncate": [
        [1.1051709651947021, 2.5, 0.6065306663513184, 1.3498587608337402],
        [0.5, 1.2214027643203735, 0.5, 1.0],
        [1.8221187591552734, 2.0137526988983154, 1.0, 1.0],
    ],
    "token_mask": [
        [1.1051709651947021, 0.0, 0.6065306663513184, 1.3498587608337402],
        [0.0, 1.2214027643203735, 0.0, 1.0],
        [1.8221187591552734, 2.0137526988983154, 1.0, 1.0],
    ],
    "sequence_truncate": [[2.4596030712127686], [0.5], [2.5]],
    "sequence_mask": [[2.4596030712127686], [0.0], [0.0]],
}
# (grpo, grpo + mask, bnpo, bnpo + mask, dr_grpo, dr_grpo + mask)
TRL_LOSSES = {
    "token_truncate": (
        0.1808224469423294,
        -0.054006338119506836,
        -0.11595291644334793,
        -0.35078170895576477,
        -0.0869646891951561,
        -0.2630862891674042,
    ),
    "token_mask": (
        0.2430706024169922,
        0.13450147211551666,
        0.00913118664175272,
        -0.09943795204162598,
        0.006848389748483896,
        -0.07457846403121948,
    ),
    "sequence_truncate": (
        -0.1706044226884842,
        -0.3413085639476776,
        -0.6450678110122681,
        -0.8157719373703003,
        -0.48380085825920105,
        -0.6118289828300476,
    ),
    "sequence_mask": (
        -0.8823493123054504,
        -0.8823493123054504,
        -1.1764657497406006,
        -1.1764657497406006,
        -0.8823493123054504,
        -0.8823493123054504,
    ),
}
TRL_GRADS = {
    "token_truncate": [[0.0, -0.188507825, 0.0, -0.112488233], [0.0] * 4, [0.167812735, 0.250347197, 0.0, 0.0]],
    "token_mask": [[0.0, 0.0, 0.0, -0.112488233], [0.0] * 4, [0.167812735, 0.250347197, 0.0, 0.0]],
    "sequence_truncate": [[0.0, -0.18546176, 0.0, -0.204966933], [0.0] * 4, [0.230243966, 0.310796827, 0.0, 0.0]],
    "sequence_mask": [[0.0, -0.18546176, 0.0, -0.204966933], [0.0] * 4, [0.0] * 4],
}
# TRL's aggregation of each loss_type, in lit-gcpo's names
TRL_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", MODES)
def test_equals_trl_1_16(mode):
    weights, _ = rollout_correction_weights(TRAINER, ENGINE, MASK, mode, c_min=0.5, c_max=2.5)
    trl_ratio = torch.tensor(TRL_RATIOS[mode]).expand_as(TRAINER)  # TRL's sequence ratio is [N, 1]
    on = MASK > 0
    torch.testing.assert_close(weights[on], trl_ratio[on], rtol=1e-6, atol=1e-7)
    for index, aggregation in enumerate(TRL_AGGREGATIONS):
        for masked in (False, True):
            logp = CURRENT.clone().requires_grad_(True)
            loss, _ = grpo_loss(
                logp,
                TRAINER,
                ADV,
                MASK,
                is_weights=weights,
                off_policy_threshold=0.5 if masked else None,
                behaviour_logp=ENGINE,
                aggregation=aggregation,
                max_len=4,
            )
            assert loss.item() == pytest.approx(TRL_LOSSES[mode][2 * index + masked], rel=1e-6, abs=1e-7), (
                aggregation,
                masked,
            )
            if aggregation == "seq_mean_token_mean" and masked:
                (grad,) = torch.autograd.grad(loss, logp)
                torch.testing.assert_close(grad, torch.tensor(TRL_GRADS[mode]), rtol=1e-6, atol=1e-8)


def test_trl_defaults_and_the_previous_lit_gcpo_default():
    # TRL's default (sequence_mask, C_min None, C_max 3.0): row 0 e^0.9 kept, row 1 e^-1.8 = 0.16530 kept (no lower
    # bound), row 2 e^1.3 = 3.669 > 3 masked. TRL 1.16 gave [[2.4596030712127686], [0.16529889404773712], [0.0]].
    weights, _ = rollout_correction_weights(TRAINER, ENGINE, MASK, "sequence_mask", None, 3.0)
    torch.testing.assert_close(weights[:, 0], torch.tensor([2.4596030712127686, 0.16529889404773712, 0.0]))
    # lit-gcpo's default, token_truncate with C_max 2 (min(exp(d), 2)); TRL 1.16 with the same settings gave:
    trl = [
        [1.1051709651947021, 2.0, 0.6065306663513184, 1.3498587608337402],
        [0.3011941909790039, 1.2214027643203735, 0.4493289887905121, 1.0],
        [1.8221187591552734, 2.0, 1.0, 1.0],
    ]
    weights, _ = rollout_correction_weights(TRAINER, ENGINE, MASK)
    torch.testing.assert_close(weights, torch.tensor(trl), rtol=1e-6, atol=1e-7)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"trainer_old_logp, engine_logp, mask must share one \[N, L\] shape"):
        rollout_correction_weights(TRAINER, ENGINE[:, :3], MASK)
    with pytest.raises(ValueError, match=r"advantages must be \[N\] = \[5\], got \(4,\)"):
        off_policy_sequence_mask(OFF_LOGP, OFF_LOGP, OFF_ADV[:4], OFF_MASK, 0.5)


# ------------------------------------------------------------------------------------ through the module
# Per-row gap d_i = old_trainer - old_engine on every token of row i (12 rows: 3 prompts x 4 completions).
GAPS = [0.0, 0.3, -0.4, 0.8, -0.02, 0.25, -0.3, 0.15, 0.1, -0.25, 0.02, -0.05]


class EngineCopy(L.Callback):
    """Makes the hf engine count as a separate copy of the policy (as vLLM is) and sets the log-probs it reported
    to the trainer's old log-probs minus ``GAPS`` (row i: old - d_i on every token), before the training step.
    ``scored``: it reads the batch's ``old_logprobs``, so the scoring pass fills them; else it scores a copy of
    the batch itself and the loss takes the old log-probs from its own forward (one iteration, no scoring pass)."""

    def __init__(self, scored: bool = True) -> None:
        self.batches: list = []
        self.scored = scored

    def rollout_fields(self, stage: str) -> set[str]:
        return {"old_logprobs"} if self.scored and stage == "train" else set()

    def setup(self, trainer, pl_module, stage) -> None:
        trainer.datamodule.collector.engine.samples_from_policy = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        gaps = torch.tensor(GAPS).unsqueeze(-1)  # [N, 1]
        old = batch.old_logprobs
        if not self.scored:
            assert old is None  # nothing else asked for them
            copy = dataclasses.replace(batch, metrics={})
            pl_module.score_rollout(copy, with_reference=False, fields={"old_logprobs"})
            old = copy.old_logprobs
        batch.engine_logprobs = torch.where(batch.completion_mask > 0, old - gaps, NAN)
        self.batches.append(batch)


@pytest.mark.parametrize(
    ("options", "weight"),
    [
        # sequence ratio exp(d_i L_i), zeroed outside [0.5, 3]; micro-batches of 5 rows (the shares add up)
        (
            {
                "rollout_correction": "sequence_mask",
                "rollout_correction_min": 0.5,
                "rollout_correction_max": 3.0,
                "micro_batch_size": 5,
            },
            lambda d, n: math.exp(d * n) if 0.5 <= math.exp(d * n) <= 3.0 else 0.0,
        ),
        # the default: token ratio exp(d_i), clamped at 2 (no lower bound)
        ({}, lambda d, n: min(math.exp(d), 2.0)),
    ],
    ids=["sequence_mask", "default_token_truncate"],
)
@pytest.mark.parametrize("scored", [True, False], ids=["scoring_pass", "training_pass_logprobs"])
def test_module_loss_applies_the_correction_and_the_off_policy_mask(tiny_model_dir, tmp_path, options, weight, scored):
    """lr 0, one step: the PPO ratio is 1, so token_mean's loss is -sum_i A_i w_i k_i L_i / sum_i L_i, with
    w_i the correction's weight of row i (L_i tokens) and k_i = 0 when A_i < 0 and KL_i = mean(engine - current)
    = -d_i > delta = 0.1 (the sampler is the engine here), from a plain loop over the captured rollout. The same
    with the old log-probs from a scoring pass (weights over the whole batch) or from the loss's own forward
    (weights per micro-batch of 5 rows with ``sequence_mask``, the metrics over the whole batch)."""
    module, data = make_pair(tiny_model_dir, lr=0.0, off_policy_mask_threshold=0.1, **options)
    engine = EngineCopy(scored)
    run = trainer(tmp_path, 1, callbacks=[engine])
    run.fit(module, data)
    batch = engine.batches[0]
    advantages, _ = group_advantages(batch.rewards, batch.group_ids, batch.num_groups)
    lengths = batch.completion_mask.sum(-1).tolist()
    total = outside = outside_tokens = dropped = dropped_tokens = 0.0
    for a, d, n in zip(advantages.tolist(), GAPS, lengths, strict=True):
        w = weight(d, n)
        keep = a >= 0 or -d <= 0.1
        total += -a * w * keep * n
        outside += w != (math.exp(d * n) if options else math.exp(d))
        outside_tokens += n * (w != (math.exp(d * n) if options else math.exp(d)))
        dropped += not keep
        dropped_tokens += n * (not keep)
    logged = run.logged_metrics
    assert float(logged["train/loss"]) == pytest.approx(total / sum(lengths), rel=1e-5, abs=1e-7)
    kind = "masked" if options else "truncated"
    assert float(logged[f"train/correction_{kind}_seq_frac"]) == pytest.approx(outside / 12)
    assert float(logged[f"train/correction_{kind}_token_frac"]) == pytest.approx(outside_tokens / sum(lengths))
    assert float(logged["train/off_policy_masked_seq_frac"]) == pytest.approx(dropped / 12)
    assert float(logged["train/off_policy_masked_token_frac"]) == pytest.approx(dropped_tokens / sum(lengths))
    assert float(logged["train/mismatch_abs_max"]) == pytest.approx(0.8, rel=1e-5)  # row 3
    assert 0 < dropped < 12 and outside > 0  # the example exercises both
    assert float(total) != 0.0


def test_module_with_the_policy_as_engine_corrects_nothing(tiny_model_dir, tmp_path):
    # The hf engine samples from the policy: no correction, and the off-policy mask compares the current
    # log-probs with themselves (on-policy, one step: KL 0), so nothing is dropped.
    module, data = make_pair(tiny_model_dir, lr=0.0, off_policy_mask_threshold=0.1)
    capture = CaptureBatches()
    run = trainer(tmp_path, 1, callbacks=[capture])
    run.fit(module, data)
    logged = run.logged_metrics
    assert not any(key.startswith("train/correction_") or key.startswith("train/mismatch") for key in logged)
    assert float(logged["train/off_policy_masked_seq_frac"]) == 0.0


def test_deprecated_tis_cap_is_the_max_of_token_truncate(tiny_model_dir):
    with pytest.warns(FutureWarning, match="tis_cap is deprecated"):
        module = GRPOModule(model=tiny_model_dir, tis_cap=1.5, export_dir=None)
    hp = module.hparams
    assert (hp.rollout_correction, hp.rollout_correction_max, hp.tis_cap) == ("token_truncate", 1.5, None)
    with pytest.warns(FutureWarning):
        module = GRPOModule(model=tiny_model_dir, tis_cap=0.0, export_dir=None)
    assert module.hparams.rollout_correction is None
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="drop tis_cap"):
        GRPOModule(model=tiny_model_dir, tis_cap=1.5, rollout_correction="sequence_mask", export_dir=None)
    with pytest.raises(ValueError, match=r"rollout_correction_min \(2.0\) must be less"):
        GRPOModule(model=tiny_model_dir, rollout_correction_min=2.0, export_dir=None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.rollout_correction_min", "3", "--model.rollout_correction_max", "2"],
            "model.rollout_correction_min",
        ),
        (["--model.rollout_correction", "token_clip"], 'Parser key "model.rollout_correction"'),
        (["--model.off_policy_mask_threshold", "0"], 'Parser key "model.off_policy_mask_threshold"'),
        (["--model.rollout_correction_max", "null"], "model.rollout_correction_max: the mode 'token_truncate'"),
    ],
)
def test_invalid_options_are_refused_at_parse_time(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in (
        "rollout_correction",
        "rollout_correction_min",
        "rollout_correction_max",
        "off_policy_mask_threshold",
    ):
        assert f"--model.{option} " in out
