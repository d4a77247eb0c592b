"""benchmarks/rollout_mismatch.py and bench_rollout_correction.py: the summaries of recorded trainer / engine
log-probs (ratios, every mode's shares, the off-policy mask's), the recorder, and the benchmark's arms."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_rollout_correction import ARMS
from rollout_mismatch import MismatchRecorder, log_ratios, mode_shares, off_policy_mask_shares, quantile_summary

from lit_gcpo.algorithms.rollout_correction import rollout_correction_problem, rollout_correction_weights
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.training.loss_step import LossStep

LN2 = math.log(2.0)


def _record(old, engine, mask, advantages) -> dict:
    return {
        "step": 0,
        "lag": 1.0,
        "old": torch.tensor(old),
        "engine": torch.tensor(engine),
        "mask": torch.tensor(mask),
        "advantages": torch.tensor(advantages),
    }


# A: two sequences. d = old - engine on mask tokens: row 0 (ln 2 - 0, 0 - ln 2), row 1 (-ln 2 - 0); the padding's
# values (5 - (-3)) must count nowhere. Token ratios 2, 1/2, 1/2; sequence ratios exp(0) = 1, exp(-ln 2) = 1/2;
# off-policy KL = -D_i / n_i: 0 / 2 = 0 and ln 2 / 1.
A = _record([[LN2, 0.0, 5.0], [-LN2, 0.0, 0.0]], [[0.0, LN2, -3.0], [0.0, 0.0, 0.0]],
            [[True, True, False], [True, False, False]], [-1.0, -1.0])  # fmt: skip
# B: one token, d = ln 4: token and sequence ratio 4, KL -ln 4.
B = _record([[math.log(4.0)]], [[0.0]], [[True]], [-1.0])


def test_log_ratios_and_their_quantiles_by_hand() -> None:
    tokens, sums, kls = log_ratios([A, B])
    assert tokens.tolist() == pytest.approx([LN2, -LN2, -LN2, math.log(4.0)])
    assert sums.tolist() == pytest.approx([0.0, -LN2, math.log(4.0)])
    assert kls.tolist() == pytest.approx([0.0, LN2, -math.log(4.0)])
    # A's token log-ratios sorted: -ln2, -ln2, ln2. Linear interpolation at q (n - 1) = 2q: p50 at 1 -> -ln2,
    # ratio 1/2; p99 at 1.98 -> -ln2 + 0.98 (2 ln2) = 0.96 ln2, ratio 2^0.96; p1 at 0.02 -> -ln2.
    summary = quantile_summary(log_ratios([A])[0], exp=True)
    assert summary["min"] == pytest.approx(0.5) and summary["max"] == pytest.approx(2.0)
    assert summary["p50"] == pytest.approx(0.5) and summary["p1"] == pytest.approx(0.5)
    assert summary["p99"] == pytest.approx(2.0**0.96)
    assert quantile_summary(torch.tensor([1.0, 3.0]))["p50"] == pytest.approx(2.0)  # not exponentiated
    with pytest.raises(ValueError, match="no values"):
        quantile_summary(torch.zeros(0))


def test_mode_shares_by_hand_means_over_steps_and_largest_step() -> None:
    # [None, 2.0]: A's ratios (2, 1/2, 1/2 and sequences 1, 1/2) are inside (a bound is inside); B's 4 is out.
    assert mode_shares([A, B], "token_truncate", None, 2.0) == pytest.approx(
        {"token": 0.5, "seq": 0.5, "token_max": 1.0, "seq_max": 1.0}
    )
    # sequence_mask [0.75, 3]: A's row 1 (ratio 1/2) is out: 1 of 3 tokens, 1 of 2 sequences; B all out.
    assert mode_shares([A, B], "sequence_mask", 0.75, 3.0) == pytest.approx(
        {"token": (1 / 3 + 1) / 2, "seq": (1 / 2 + 1) / 2, "token_max": 1.0, "seq_max": 1.0}
    )
    # token_truncate [0.75, 3]: A's two tokens of ratio 1/2 are out (2 of 3), and each row holds one (2 of 2).
    assert mode_shares([A, B], "token_truncate", 0.75, 3.0) == pytest.approx(
        {"token": (2 / 3 + 1) / 2, "seq": 1.0, "token_max": 1.0, "seq_max": 1.0}
    )
    # token_mask [0.75, 3] on A alone: the same tokens as token_truncate, now masked.
    assert mode_shares([A], "token_mask", 0.75, 3.0)["token"] == pytest.approx(2 / 3)


def test_off_policy_mask_shares_by_hand() -> None:
    # delta 0.5: A's row 1 has KL ln 2 = 0.69 > 0.5 and a negative advantage: dropped (1 of 2 sequences, 1 of 3
    # tokens); row 0 (KL 0) and B (KL -1.39) are kept. Means over the two steps: 1/4 and 1/6.
    assert off_policy_mask_shares([A, B], 0.5) == pytest.approx(
        {"token": 1 / 6, "seq": 1 / 4, "token_max": 1 / 3, "seq_max": 1 / 2}
    )
    assert off_policy_mask_shares([A], 0.7)["seq"] == 0.0  # ln 2 < 0.7
    kept = {**A, "advantages": torch.tensor([-1.0, 1.0])}  # a positive advantage is never dropped
    assert off_policy_mask_shares([kept], 0.5)["seq"] == 0.0


def _loss_step() -> LossStep:
    return LossStep(
        advantage="grpo", advantage_scale="group", loss_aggregation="token_mean", eps_low=0.2, eps_high=0.2,
        dual_clip=None, ratio_level="token", rollout_correction="sequence_mask", rollout_correction_min=None,
        rollout_correction_max=2.0, off_policy_mask_threshold=None, beta=0.0, kl_estimator="k3", entropy_coef=0.0,
        num_iterations=1, mask_truncated_completions=False,
    )  # fmt: skip


def _batch(samples_from_policy: bool) -> RolloutBatch:
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return RolloutBatch(
        prompts=["1+1="], rows=[{}], completions=["2", "3"], input_ids=torch.ones(2, 3, dtype=torch.long),
        attention_mask=torch.ones(2, 3, dtype=torch.long), completion_mask=mask, group_ids=torch.tensor([0, 0]),
        rewards=torch.tensor([1.0, 0.0]), engine_logprobs=torch.tensor([[-0.5, -0.25], [-1.0, 0.0]]),
        old_logprobs=torch.tensor([[-0.4, -0.25], [-1.5, 0.0]]), samples_from_policy=samples_from_policy,
        metrics={"rollout/weight_lag": 1.0},
    )  # fmt: skip


def test_recorder_keeps_what_the_correction_reads_and_refuses_an_empty_fit(tmp_path: Path) -> None:
    recorder = MismatchRecorder(str(tmp_path / "records.pt"))
    # it declares what it reads: with one iteration per rollout nothing else may ask for the old log-probs
    assert recorder.rollout_fields("train") == {"old_logprobs"} and recorder.rollout_fields("val") == set()
    module = SimpleNamespace(loss_step=_loss_step())
    recorder.on_train_batch_start(SimpleNamespace(global_step=7), module, _batch(samples_from_policy=True), 0)
    assert recorder.records == []  # the policy sampled it: nothing to correct
    with pytest.raises(RuntimeError, match="no training batch had engine log-probs"):
        recorder.on_fit_end(None, module)
    recorder.on_train_batch_start(SimpleNamespace(global_step=7), module, _batch(samples_from_policy=False), 0)
    recorder.on_fit_end(None, module)
    (saved,) = torch.load(tmp_path / "records.pt", weights_only=True)
    assert (saved["step"], saved["lag"]) == (7, 1.0)
    assert saved["mask"].tolist() == [[True, True], [True, False]]
    assert saved["engine"].tolist() == [[-0.5, -0.25], [-1.0, 0.0]]
    # GRPO advantages of rewards (1, 0): mean 1/2, unbiased std sqrt(1/2), A = +-0.5 / (0.70711 + 1e-4)
    assert saved["advantages"].tolist() == pytest.approx([0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4)])
    # the token log-ratios the loss's correction sees: -0.4 + 0.5, -0.25 + 0.25, -1.5 + 1.0
    assert log_ratios([saved])[0].tolist() == pytest.approx([0.1, 0.0, -0.5])


def test_every_arm_is_a_valid_setting_and_none_weighs_every_token_one() -> None:
    for arm in ARMS:
        options = dict(zip(arm.options()[::2], arm.options()[1::2], strict=True))
        bounds = [options[f"--model.rollout_correction{end}"] for end in ("", "_min", "_max")]
        as_float = [None if value == "null" else float(value) for value in bounds[1:]]
        assert rollout_correction_problem(bounds[0], *as_float) is None, arm
    (none,) = [arm for arm in ARMS if arm.mode is None]
    options = dict(zip(none.options()[::2], none.options()[1::2], strict=True))
    c_min, c_max = float(options["--model.rollout_correction_min"]), float(options["--model.rollout_correction_max"])
    log_ratio = torch.log(torch.tensor([[0.1, 0.9, 1.0, 1.1, 10.0]]))  # trainer - engine
    weights, _ = rollout_correction_weights(
        log_ratio, torch.zeros(1, 5), torch.ones(1, 5), "token_truncate", c_min, c_max
    )
    assert (weights - 1).abs().max() <= 1.1e-6  # 1e-6 plus float32 rounding near 1 (1.2e-7 apart)
