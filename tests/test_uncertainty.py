"""Uncertainty signals and advantage weights (METHODS.md §4-5): hand-derived values and a per-group loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_gcpo.algorithms.uncertainty import (
    barycentric_transport,
    center_embeddings,
    cosine_dispersion,
    reward_dispersion,
    semantic_entropy,
    uncertainty_signals,
)


def _unit2d(theta: float) -> list[float]:
    return [math.cos(theta), math.sin(theta), 0.0]


def test_semantic_entropy_hand_values() -> None:
    # Group 0: 4 completions, one cluster -> SE = 0. Group 1: 4 singletons -> SE = log 4, SE_n = 1.
    # Group 2: 1 completion -> SE_n = 0 (log 1 = 0). Group 3: clusters {2, 1, 1} of 4 with discrete
    # p = (1/2, 1/4, 1/4): SE = 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2, SE_n = 1.5 log 2 / log 4 = 0.75.
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3])
    cluster_ids = torch.tensor([5, 5, 5, 5, 0, 1, 2, 3, 0, 0, 0, 1, 2])
    se, metrics = semantic_entropy(cluster_ids, group_ids, 4, kind="discrete", normalise=False)
    torch.testing.assert_close(se, torch.tensor([0.0, math.log(4), 0.0, 1.5 * math.log(2)]))
    se_n, _ = semantic_entropy(cluster_ids, group_ids, 4, kind="discrete", normalise=True)
    torch.testing.assert_close(se_n, torch.tensor([0.0, 1.0, 0.0, 0.75]))
    torch.testing.assert_close(metrics["se_n_max"], torch.tensor(1.0))
    # Rao with equal log-likelihoods is the discrete estimator.
    rao, _ = semantic_entropy(cluster_ids, group_ids, 4, torch.full((13,), -0.7), kind="rao", normalise=False)
    torch.testing.assert_close(rao, se)


def test_semantic_entropy_rao_weights_clusters_by_likelihood() -> None:
    # Two completions in two clusters, length-normalised log-likelihoods 0 and log(1/3):
    # pi = softmax = (1, 1/3) / (4/3) = (3/4, 1/4); SE = -(0.75 log 0.75 + 0.25 log 0.25) = 0.562335.
    group_ids = torch.tensor([0, 0])
    se, _ = semantic_entropy(torch.tensor([0, 1]), group_ids, 1, torch.tensor([0.0, math.log(1 / 3)]), "rao", False)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert se.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.562335, abs=1e-6)
    # A NaN log-likelihood has no mass: the other cluster holds everything -> SE = 0.
    se_nan, _ = semantic_entropy(torch.tensor([0, 1]), group_ids, 1, torch.tensor([0.0, math.nan]), "rao", False)
    assert se_nan.item() == 0.0


def test_rao_requires_seq_logprobs() -> None:
    with pytest.raises(ValueError, match="seq_logprobs"):
        semantic_entropy(torch.tensor([0, 1]), torch.tensor([0, 0]), 1, None, kind="rao")


def test_anisotropy_bot_separates_what_entropy_cannot() -> None:
    # Two groups of 4, each two clusters of two identical unit vectors, discrete p = (1/2, 1/2), so
    # SE = log 2 in both. Clusters at angle theta: mu_k unit, BoT = 1 - |(u + v) / 2|^2 = (1 - cos theta) / 2.
    # Near-synonyms theta = 0.1: BoT = (1 - cos 0.1) / 2 = 0.0024979; orthogonal: BoT = 0.5.
    near, far = 0.1, math.pi / 2
    embeddings = torch.tensor(
        [_unit2d(0.0)] * 2 + [_unit2d(near)] * 2 + [_unit2d(0.0)] * 2 + [_unit2d(far)] * 2
    )  # [8, 3]
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    cluster_ids = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    se, _ = semantic_entropy(cluster_ids, group_ids, 2, kind="discrete", normalise=False)
    torch.testing.assert_close(se, torch.tensor([math.log(2), math.log(2)]))
    bot, _ = barycentric_transport(embeddings, cluster_ids, group_ids, 2, kind="discrete")
    torch.testing.assert_close(bot, torch.tensor([(1 - math.cos(near)) / 2, 0.5]))
    assert bot[0].item() == pytest.approx(0.0024979, abs=1e-7)


def test_bot_zero_for_one_cluster_and_rao_masses() -> None:
    # One cluster of spread-out vectors: p = 1, mu_bar = mu_1, BoT = |mu_1|^2 - |mu_1|^2 = 0.
    embeddings = torch.tensor([_unit2d(0.0), _unit2d(1.0), _unit2d(2.0)])
    bot, _ = barycentric_transport(embeddings, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1,
                                   kind="discrete")  # fmt: skip
    assert bot.item() == 0.0
    # Antipodal clusters with Rao masses (3/4, 1/4): BoT = 1 - |0.75 u - 0.25 u|^2 = 1 - 0.25 = 0.75.
    anti = torch.tensor([_unit2d(0.0), _unit2d(math.pi)])
    bot, _ = barycentric_transport(anti, torch.tensor([0, 1]), torch.tensor([0, 0]), 1,
                                   torch.tensor([0.0, math.log(1 / 3)]), "rao")  # fmt: skip
    assert bot.item() == pytest.approx(0.75, abs=1e-6)


def test_cosine_dispersion_hand_values() -> None:
    # Group 0: identical vectors -> CD = 0. Group 1: (1,0), (1,0), (0,1): sum_{i != j} <e_i, e_j> = 2 * 1 = 2,
    # CD = 1 - 2 / (3 * 2) = 2/3. Group 2: antipodal pair, 1 - (-1) = 2 clamped to 1. Group 3: one vector -> 0.
    # Group 4: scale does not matter (normalised inside): (3, 0) and (0, 0.5) -> CD = 1 - 0 = 1.
    embeddings = torch.tensor(
        [[0.6, 0.8]] * 3 + [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]] + [[1.0, 0.0], [-1.0, 0.0]] + [[0.0, 1.0]]
        + [[3.0, 0.0], [0.0, 0.5]]
    )  # fmt: skip
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4])
    cd, metrics = cosine_dispersion(embeddings, group_ids, 5)
    torch.testing.assert_close(cd, torch.tensor([0.0, 2 / 3, 1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["cd_mean"], torch.tensor((2 / 3 + 2) / 5))


def test_reward_dispersion_hand_values() -> None:
    # {0, 1} rewards, max std 0.5. [0,0,1,1]: std 0.5 -> 1. [0,0,0,1]: mean 1/4,
    # var = (3 (1/4)^2 + (3/4)^2) / 4 = 3/16, std = sqrt(3)/4 = 0.4330 -> 0.8660. [1,1,1,1] -> 0.
    # [1, NaN, 0]: NaN left out -> [1, 0] -> std 0.5 -> 1 (one non-finite reward counted).
    rewards = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, math.nan, 0.0])
    group_ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 3)
    rd, metrics = reward_dispersion(rewards, group_ids, 4)
    torch.testing.assert_close(rd, torch.tensor([1.0, math.sqrt(3) / 2, 0.0, 1.0]))
    assert metrics["nonfinite_rewards"].item() == 1
    # Range (0, 2): max std 1; rewards [0, 2] have std 1 -> RD = 1; [0.5, 1.5] -> std 0.5 -> 0.5.
    rd, _ = reward_dispersion(torch.tensor([0.0, 2.0, 0.5, 1.5]), torch.tensor([0, 0, 1, 1]), 2, (0.0, 2.0))
    torch.testing.assert_close(rd, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="reward_range"):
        reward_dispersion(rewards, group_ids, 4, (1.0, 1.0))


def test_centring_over_the_step_hand_values() -> None:
    # Two groups of two: (1,0), (3,0) and (1,4), (3,4). Step mean (2, 2), centred rows (-1,-2), (1,-2), (-1,2),
    # (1,2): within each group cos = (-1 + 4) / 5 = 0.6, so CD = 1 - 2 * 0.6 / 2 = 0.4 in both groups.
    # Raw: group 0 is one direction (CD 0); group 1 has cos = (3 + 16) / (sqrt(17) * 5), CD = 1 - that.
    # Centring each group on its own mean instead (the wrong reading) makes the two rows antipodal: CD = 1.
    embeddings = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 4.0], [3.0, 4.0]])
    group_ids = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    centred, _ = uncertainty_signals(group_ids, 2, rewards=rewards, embeddings=embeddings, center="batch")
    torch.testing.assert_close(centred["cd"], torch.tensor([0.4, 0.4]))
    raw, _ = uncertainty_signals(group_ids, 2, rewards=rewards, embeddings=embeddings, center="none")
    torch.testing.assert_close(raw["cd"], torch.tensor([0.0, 1 - 19 / (math.sqrt(17) * 5)]))
    per_group = embeddings - embeddings.view(2, 2, 2).mean(1).repeat_interleave(2, 0)
    wrong, _ = cosine_dispersion(per_group, group_ids, 2)
    assert not torch.allclose(wrong, centred["cd"])  # what a per-group centring would give: (1, 1)
    torch.testing.assert_close(center_embeddings(embeddings).float(), embeddings - torch.tensor([2.0, 2.0]))
    # A step whose rows all equal its mean has no direction left: returned uncentred, not as zero vectors.
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    torch.testing.assert_close(center_embeddings(same).float(), same)
    with pytest.raises(ValueError, match="center 'group'"):
        uncertainty_signals(group_ids, 2, rewards=rewards, embeddings=embeddings, center="group")


def _loop_reference(group_ids, cluster_ids, embeddings, seq_logprobs, rewards, num_groups, kind):
    """Plain per-group formulas: explicit pairwise CD, BoT in its |mu_k - mu_bar|^2 form."""
    out = {name: [] for name in ("se", "se_n", "cd", "bot", "rd")}
    for b in range(num_groups):
        idx = (group_ids == b).nonzero().flatten().tolist()
        size = len(idx)
        if kind == "rao":
            pi = torch.softmax(seq_logprobs[idx].double(), 0)
        else:
            pi = torch.full((size,), 1.0 / max(size, 1), dtype=torch.float64)
        units = [embeddings[i].double() / embeddings[i].double().norm() for i in idx]
        clusters: dict[int, list[int]] = {}
        for pos, i in enumerate(idx):
            clusters.setdefault(int(cluster_ids[i]), []).append(pos)
        masses = {k: float(sum(pi[p] for p in members)) for k, members in clusters.items()}
        se = -sum(p * math.log(p) for p in masses.values() if p > 0)
        out["se"].append(se)
        out["se_n"].append(se / math.log(size) if size > 1 else 0.0)
        pair_sum = sum(float(units[i] @ units[j]) for i in range(size) for j in range(size) if i != j)
        out["cd"].append(min(max(1 - pair_sum / (size * (size - 1)), 0.0), 1.0) if size > 1 else 0.0)
        means = {k: torch.stack([units[p] for p in m]).mean(0) for k, m in clusters.items()}
        bary = sum(masses[k] * means[k] for k in clusters) if clusters else torch.zeros(1)
        out["bot"].append(sum(masses[k] * float((means[k] - bary).pow(2).sum()) for k in clusters))
        values = [float(rewards[i]) for i in idx]
        mean = sum(values) / size if size else 0.0
        out["rd"].append(min(math.sqrt(sum((v - mean) ** 2 for v in values) / size) / 0.5, 1.0) if size else 0.0)
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in out.items()}


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["rao", "discrete"]),
    shuffle=st.booleans(),
    center=st.sampled_from(["batch", "none"]),
)
def test_vectorised_signals_match_per_group_loop(
    sizes: list[int], seed: int, kind: str, shuffle: bool, center: str
) -> None:
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [N]
    if shuffle:  # the functions must not rely on group-major order
        group_ids = group_ids[torch.randperm(len(group_ids), generator=generator)]
    n = len(group_ids)
    cluster_ids = torch.randint(0, 3, (n,), generator=generator)  # local ids, reused across groups
    embeddings = torch.randn(n, 5, generator=generator)
    seq_logprobs = -3 * torch.rand(n, generator=generator)
    rewards = torch.randint(0, 2, (n,), generator=generator).float()
    signals, _ = uncertainty_signals(
        group_ids, len(sizes), rewards=rewards, cluster_ids=cluster_ids, embeddings=embeddings,
        seq_logprobs=seq_logprobs, se_kind=kind, center=center,
    )  # fmt: skip
    if center == "batch" and n > 1:  # plain loop: the mean of all rows of the step, subtracted row by row
        mean = [sum(float(embeddings[i, j]) for i in range(n)) / n for j in range(embeddings.shape[1])]
        embeddings = torch.tensor([[float(embeddings[i, j]) - mean[j] for j in range(5)] for i in range(n)])
    expected = _loop_reference(group_ids, cluster_ids, embeddings, seq_logprobs, rewards, len(sizes), kind)
    for name, value in expected.items():
        torch.testing.assert_close(signals[name], value, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(signals["u_c"], expected["bot"] * (1 - expected["rd"]), atol=1e-5, rtol=0)
