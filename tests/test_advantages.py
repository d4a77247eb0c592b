from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_gcpo.algorithms.advantages import ADVANTAGE_MODES, group_advantages
from lit_gcpo.algorithms.registry import Registry

# Three groups of unequal sizes, not contiguous in group 2:
#   group 0: [1, 0, 0, 1]  mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
#   group 1: [0.1, 0.1, 0.1]  zero spread -> exactly 0 (even though 0.1 * 3 / 3 carries float noise)
#   group 2: [2, 0]  mean 1, unbiased var = (1 + 1) / 1 = 2, std = 1.41421
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 2.0, 0.1, 0.0])
GROUP_IDS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 1, 2])


def test_grpo_group_scale_by_hand():
    adv, metrics = group_advantages(REWARDS, GROUP_IDS, mode="grpo")
    a0 = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86588
    a2 = 1.0 / (math.sqrt(2) + 1e-4)  # 0.70706
    expected = torch.tensor([a0, -a0, -a0, a0, 0.0, 0.0, a2, 0.0, -a2])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    assert (adv[[4, 5, 7]] == 0).all()  # exactly, not approximately
    assert metrics["zero_spread_frac"].item() == pytest.approx(1 / 3)
    assert metrics["nonfinite_rewards"].item() == 0
    assert metrics["advantage_max"].item() == pytest.approx(a0, rel=1e-6)
    assert metrics["advantage_min"].item() == pytest.approx(-a0, rel=1e-6)


def test_dr_grpo_has_no_std_division():
    adv, _ = group_advantages(REWARDS, GROUP_IDS, num_groups=3, mode="dr_grpo")
    # r - group mean: group 0 +-0.5, group 1 zero spread, group 2 +-1.
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, 0.0, -1.0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_grpo_batch_scale_uses_std_of_all_rewards():
    adv, _ = group_advantages(REWARDS, GROUP_IDS, mode="grpo", scale="batch")
    batch_std = REWARDS.double().std().item()  # unbiased std of all 9 rewards
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    expected = (centred / (batch_std + 1e-4)).float()
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)


def test_nonfinite_rewards_get_zero_and_are_excluded_and_counted():
    # group 0: [1, NaN, 0, inf] -> finite [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70711
    # group 1: [-inf, 3] -> a single finite reward: no spread, all 0
    # group 2: [NaN, NaN] -> nothing finite, all 0
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("inf"), float("-inf"), 3.0, float("nan"), float("nan")])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv, metrics = group_advantages(rewards, group_ids)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    expected = torch.tensor([a, 0.0, -a, 0.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(adv).all()
    assert metrics["nonfinite_rewards"].item() == 5
    assert metrics["zero_spread_frac"].item() == pytest.approx(2 / 3)
    # finite rewards 1, 0, 3: mean 4/3
    assert metrics["reward_mean"].item() == pytest.approx(4 / 3)


def test_unknown_mode_and_scale_list_valid_names():
    with pytest.raises(ValueError, match="dr_grpo, grpo"):
        group_advantages(REWARDS, GROUP_IDS, mode="ppo")
    with pytest.raises(ValueError, match="batch"):
        group_advantages(REWARDS, GROUP_IDS, scale="global")


def test_registry_basics():
    reg: Registry[int] = Registry("thing")
    reg.register("b")(2)
    reg.add("a", 1)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(ValueError, match="unknown thing 'c'; valid names: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    assert reg.remove("a") == 1 and reg.names() == ["b"] and "a" not in reg
    with pytest.raises(ValueError, match="unknown thing 'a'; valid names: b"):
        reg.remove("a")
    assert ADVANTAGE_MODES.names() == ["dr_grpo", "grpo"]


def _loop_reference(rewards: list[float], group_ids: list[int], mode: str, scale: str, eps: float) -> list[float]:
    """Plain per-group loop in float64, written from METHODS.md section 1."""
    finite_all = [r for r in rewards if math.isfinite(r)]
    if len(finite_all) > 1:
        m = sum(finite_all) / len(finite_all)
        batch_std = math.sqrt(sum((r - m) ** 2 for r in finite_all) / (len(finite_all) - 1))
    else:
        batch_std = 0.0
    out = [0.0] * len(rewards)
    for g in set(group_ids):
        idx = [i for i, gi in enumerate(group_ids) if gi == g and math.isfinite(rewards[i])]
        vals = [rewards[i] for i in idx]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        denom = (std if scale == "group" else batch_std) + eps
        for i in idx:
            out[i] = (rewards[i] - mean) / denom if mode == "grpo" else rewards[i] - mean
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.one_of(st.sampled_from([0.0, 1.0, 0.5, float("nan"), float("inf")]), st.floats(-3, 3)),
        ),
        min_size=1,
        max_size=40,
    ),
    mode=st.sampled_from(["grpo", "dr_grpo"]),
    scale=st.sampled_from(["group", "batch"]),
)
def test_vectorised_matches_per_group_loop(data, mode, scale):
    group_ids = [g for g, _ in data]
    rewards = [r for _, r in data]
    adv, metrics = group_advantages(
        torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids), mode=mode, scale=scale
    )
    expected = torch.tensor(_loop_reference(rewards, group_ids, mode, scale, 1e-4), dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=1e-9, atol=1e-9)
    assert metrics["nonfinite_rewards"].item() == sum(not math.isfinite(r) for r in rewards)
