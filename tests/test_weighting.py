"""Advantage weights (METHODS.md §5, §5.1): hand-derived values, the planted wrong readings, and a step split
over two simulated ranks against the same step on one."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lit_gcpo.algorithms.uncertainty import uncertainty_signals
from lit_gcpo.algorithms.weighting import (
    WEIGHT_FAMILIES,
    advantage_weights,
    calibrated_uncertainty,
    normalise_to_mean_one,
    scale_free_uncertainty,
    signal_statistics,
    spread_mean,
)

# Four groups; group 3 has no reward spread (RD = 0), so it never enters a step mean.
SIGNALS = {
    "se_n": torch.tensor([1.0, 0.0, 0.5, 0.2]),
    "bot": torch.tensor([0.4, 0.8, 0.3, 0.9]),
    "cd": torch.tensor([0.2, 0.4, 0.6, 0.1]),
    "rd": torch.tensor([0.5, 0.75, 0.5, 0.0]),
}


def test_weight_families_hand_values_and_ranges() -> None:
    # At x = 0.5: inverse 1/1.5 = 2/3, linear 0.5, exponential e^-0.5, focal (gamma 2) 0.25.
    x = torch.tensor([0.5])
    expected = {"inverse": 2 / 3, "linear": 0.5, "exponential": math.exp(-0.5), "focal": 0.25}
    assert set(WEIGHT_FAMILIES.names()) == set(expected)
    for name, value in expected.items():
        assert WEIGHT_FAMILIES.get(name)(x, 2.0).item() == pytest.approx(value, abs=1e-7)
    # Every family maps x in [0, 1] into [0, 1], is 1 at x = 0 and is non-increasing; linear and focal
    # are clamped at 0 past x = 1.
    grid = torch.linspace(0, 1, 101)
    for name in WEIGHT_FAMILIES:
        w = WEIGHT_FAMILIES.get(name)(grid, 2.0)
        assert w[0].item() == 1.0 and (w >= 0).all() and (w <= 1).all() and (w.diff() <= 0).all(), name
    assert WEIGHT_FAMILIES.get("linear")(torch.tensor([1.5]), 2.0).item() == 0.0
    assert WEIGHT_FAMILIES.get("focal")(torch.tensor([1.5]), 3.0).item() == 0.0


def test_gcpo_defaults_hand_values() -> None:
    # U_c = BoT (1 - RD) = (0.2, 0.2, 0.15, 0.9). Mean over the RD > 0 groups 0-2: 0.55 / 3 = 11/60, so
    # u = (12/11, 12/11, 9/11, 54/11); inverse, alpha 1: w = 11/23, 11/23, 11/20, 11/65. Mean of w over groups
    # 0-2 = (22/23 + 11/20) / 3 = 231/460; normalised: 220/231, 220/231, 253/231 and (11/65)(460/231).
    weights, details = advantage_weights("gcpo", SIGNALS)
    expected = torch.tensor([220 / 231, 220 / 231, 253 / 231, 11 / 65 * 460 / 231])
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(details["u"], torch.tensor([12 / 11, 12 / 11, 9 / 11, 54 / 11]))
    torch.testing.assert_close(details["u_scale"], torch.tensor(11 / 60))
    assert weights[:3].mean().item() == pytest.approx(1.0, abs=1e-6)
    # The wrong reading, a mean over every group including the zero-spread one, gives other weights.
    raw = torch.tensor([11 / 23, 11 / 23, 11 / 20, 11 / 65])
    assert not torch.allclose(weights, raw / raw.mean(), atol=1e-3)
    # Without scale and normalisation: w = 1 / (1 + U_c).
    plain, _ = advantage_weights("gcpo", SIGNALS, scale="none", normalise=False)
    torch.testing.assert_close(plain, 1 / (1 + torch.tensor([0.2, 0.2, 0.15, 0.9])))
    # CD as U: U_c = (0.1, 0.1, 0.3, 0.1), mean over groups 0-2 = 0.5/3, u = (0.6, 0.6, 1.8, 0.6); exponential.
    cd, _ = advantage_weights("gcpo", SIGNALS, geometric="cd", family="exponential", normalise=False)
    torch.testing.assert_close(cd, torch.exp(-torch.tensor([0.6, 0.6, 1.8, 0.6])))


def test_seed_grpo_rd_only_and_grpo_hand_values() -> None:
    # seed_grpo's official rule: inverse, alpha 0.0417, no scale, no normalisation.
    weights, _ = advantage_weights("seed_grpo", SIGNALS)
    torch.testing.assert_close(weights, 1 / (1 + 0.0417 * SIGNALS["se_n"]))
    # seed_grpo scale-free: SE_n mean over groups 0-2 = 0.5, u = (2, 0, 1, 0.4), w = (1/3, 1, 1/2, 1/1.4),
    # mean over groups 0-2 = 11/18, normalised: 6/11, 18/11, 9/11, 90/77.
    weights, _ = advantage_weights("seed_grpo", SIGNALS, alpha=1.0, scale="batch_mean", normalise=True)
    torch.testing.assert_close(weights, torch.tensor([6 / 11, 18 / 11, 9 / 11, 90 / 77]))
    # rd_only: U = 1 gives U_c = 1 - RD = (0.5, 0.25, 0.5, 1); mean over 0-2 = 5/12, u = (6/5, 3/5, 6/5, 12/5),
    # w = (5/11, 5/8, 5/11, 5/17), mean over 0-2 = 45/88, normalised: 8/9, 11/9, 8/9, 88/153.
    weights, _ = advantage_weights("rd_only", SIGNALS)
    torch.testing.assert_close(weights, torch.tensor([8 / 9, 11 / 9, 8 / 9, 88 / 153]))
    weights, _ = advantage_weights("grpo", SIGNALS, scale="batch_mean", normalise=True, family="linear")
    torch.testing.assert_close(weights, torch.ones(4))
    torch.testing.assert_close(
        calibrated_uncertainty(SIGNALS["bot"], SIGNALS["rd"]), torch.tensor([0.2, 0.2, 0.15, 0.9])
    )
    with pytest.raises(ValueError, match="gcpo, grpo, rd_only, seed_grpo"):
        advantage_weights("ppo", SIGNALS)
    with pytest.raises(ValueError, match="exponential, focal, inverse, linear"):
        advantage_weights("gcpo", SIGNALS, family="cubic")
    with pytest.raises(ValueError, match="'se_n'"):
        advantage_weights("seed_grpo", {"rd": SIGNALS["rd"]})
    with pytest.raises(ValueError, match="scale 'max'"):
        advantage_weights("gcpo", SIGNALS, scale="max")


def test_step_means_skip_zero_spread_groups_and_degenerate_steps() -> None:
    rd = torch.tensor([0.0, 0.5, 0.0])
    # spread_mean over group 1 only; a zero-spread group's large value never enters it.
    assert spread_mean(torch.tensor([100.0, 2.0, -7.0]), rd).item() == 2.0
    # No uncertainty on the spread groups: u = 0 everywhere (w = 1), whatever the zero-spread groups hold.
    u, mean = scale_free_uncertainty(torch.tensor([0.7, 0.0, 0.3]), rd)
    assert mean.item() == 0.0 and u.tolist() == [0.0, 0.0, 0.0]
    # No spread group at all: normalisation leaves the weights as they are.
    weights = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(normalise_to_mean_one(weights, torch.zeros(2)), weights)
    # Normalised over the spread group only: 0.25 -> 1, so every weight is multiplied by 4.
    torch.testing.assert_close(normalise_to_mean_one(weights, torch.tensor([0.0, 1.0])), torch.tensor([2.0, 1.0]))


def test_signal_statistics_hand_values() -> None:
    # mean 2.5, min 1, max 4, population std sqrt(((1.5^2 + 0.5^2) * 2) / 4) = sqrt(1.25)
    stats = signal_statistics("w", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert [stats[f"w_{s}"].item() for s in ("mean", "min", "max")] == [2.5, 1.0, 4.0]
    assert stats["w_std"].item() == pytest.approx(math.sqrt(1.25), abs=1e-6)
    assert all(value.item() == 0.0 for value in signal_statistics("w", torch.zeros(0)).values())


class _ThreadRanks:
    """A sum-all-reduce between threads standing in for data-parallel ranks."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def reduce_for(self, rank: int):
        def reduce(value: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = value.clone()
            self.barrier.wait()
            total = torch.stack([slot for slot in self.slots if slot is not None]).sum(0)
            self.barrier.wait()  # every rank has read before the next call overwrites a slot
            return total

        return reduce


def _step(group_ids, embeddings, rewards, cluster_ids, num_groups, method, reduce=None):
    options = {} if reduce is None else {"reduce": reduce}
    signals, _ = uncertainty_signals(
        group_ids, num_groups, rewards=rewards, cluster_ids=cluster_ids, embeddings=embeddings,
        se_kind="discrete", center="batch", **options,
    )  # fmt: skip
    return advantage_weights(method, signals, **options)[0]


@pytest.mark.parametrize("method", ["gcpo", "rd_only"])
def test_a_step_split_over_two_ranks_gets_the_weights_of_the_whole_step(method: str) -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = (3, 2)  # rank 0 holds 3 groups, rank 1 holds 2 (of 4 completions each)
    group_ids = torch.arange(5).repeat_interleave(4)  # [20]
    embeddings = torch.randn(20, 6, generator=generator) + 3.0  # a shared offset: centring matters
    rewards = torch.randint(0, 2, (20,), generator=generator).float()
    rewards[16:] = 1.0  # the last group has no spread
    cluster_ids = torch.randint(0, 3, (20,), generator=generator)
    whole = _step(group_ids, embeddings, rewards, cluster_ids, 5, method)
    ranks = _ThreadRanks(2)
    parts = [slice(0, 12), slice(12, 20)]
    offsets = (0, 3)

    def rank_step(rank: int) -> torch.Tensor:
        rows = parts[rank]
        return _step(
            group_ids[rows] - offsets[rank], embeddings[rows], rewards[rows], cluster_ids[rows], sizes[rank], method,
            reduce=ranks.reduce_for(rank),
        )  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        split = torch.cat(list(pool.map(rank_step, range(2))))
    torch.testing.assert_close(split, whole)
    # Without the reduction each rank centres, scales and normalises on its own groups: other weights.
    alone = torch.cat([_step(group_ids[r] - o, embeddings[r], rewards[r], cluster_ids[r], s, method)
                       for r, o, s in zip(parts, offsets, sizes, strict=True)])  # fmt: skip
    assert not torch.allclose(alone, whole, atol=1e-4)
