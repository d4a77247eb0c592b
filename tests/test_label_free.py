"""Label-free rewards (METHODS.md §7) and the per-token distribution summaries: hand values and plain loops."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from lit_gcpo.algorithms.label_free import (
    EMPO,
    LABEL_FREE_REWARDS,
    RENT,
    answer_clusters,
    empo_rewards,
    rent_rewards,
    self_certainty_rewards,
    ttrl_rewards,
)
from lit_gcpo.algorithms.token_distribution import token_distribution_stats


def test_answer_clusters_exact_strings_and_missing_singletons() -> None:
    # "" and None are missing: each its own cluster, never equal to another; "4" in group 1 is not group 0's "4".
    cluster_ids, answered = answer_clusters(["4", None, "4", "", "7", "4", None], [0, 0, 0, 0, 0, 1, 1])
    assert cluster_ids.tolist() == [0, 1, 0, 2, 3, 0, 1]
    assert answered.tolist() == [True, False, True, False, True, True, False]


def test_ttrl_majority_by_hand() -> None:
    # Group 0 (G = 5): "4" x2, "7" x2, one missing: a tie, won by "4" (first to appear, Counter.most_common's
    # order) -> r = [1, 1, 0, 0, 0], majority 2/5. Group 1: nothing answered -> r = 0, majority 0.
    # Group 2 (G = 4): "b" x3 -> r = [0, 1, 1, 1], majority 3/4. Group 3 (G = 3): "" twice and "5" once: the
    # empty answers do not vote (TTRL's extractor would let "" win), so "5" wins with one vote -> r = [0, 0, 1].
    answers = ["4", "4", "7", None, "7", None, None, None, "a", "b", "b", "b", "", "", "5"]
    group_ids = [0] * 5 + [1] * 3 + [2] * 4 + [3] * 3
    cluster_ids, answered = answer_clusters(answers, group_ids)
    rewards, metrics = ttrl_rewards(cluster_ids, torch.tensor(group_ids), 4, answered)
    assert rewards.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1]
    assert rewards.dtype == torch.float32
    # majority ratios (2/5, 0, 3/4, 1/3): mean = (0.4 + 0 + 0.75 + 0.3333) / 4 = 0.370833
    assert metrics["majority_ratio_mean"].item() == pytest.approx((0.4 + 0.75 + 1 / 3) / 4, abs=1e-6)
    assert metrics["majority_ratio_max"].item() == pytest.approx(0.75, abs=1e-7)
    assert metrics["answered_frac"].item() == pytest.approx(9 / 15, abs=1e-7)
    # A completion without an answer is never rewarded, even when a caller files it under the winning cluster.
    shared, _ = ttrl_rewards(
        torch.tensor([0, 0, 0, 1]), torch.zeros(4, dtype=torch.long), 1, torch.tensor([1, 1, 0, 1]).bool()
    )
    assert shared.tolist() == [1, 1, 0, 0]
    # The tie goes to whichever answer appears first: swap the order and "7" wins.
    swapped, _ = ttrl_rewards(torch.tensor([1, 1, 0, 2, 0]), torch.zeros(5, dtype=torch.long), 1, answered[:5])
    assert swapped.tolist() == [1, 1, 0, 0, 0]
    cluster_first_7, answered_first_7 = answer_clusters(["7", "4", "4", None, "7"], [0] * 5)
    first_7, _ = ttrl_rewards(cluster_first_7, torch.zeros(5, dtype=torch.long), 1, answered_first_7)
    assert first_7.tolist() == [1, 0, 0, 0, 1]


def _ttrl_loop(cluster_ids: list[int], group_ids: list[int], answered: list[bool]) -> list[float]:
    rewards = [0.0] * len(cluster_ids)
    for group in set(group_ids):
        members = [i for i, g in enumerate(group_ids) if g == group]
        votes = Counter(cluster_ids[i] for i in members if answered[i])  # insertion order = first appearance
        if not votes:
            continue
        winner = votes.most_common(1)[0][0]
        for i in members:
            rewards[i] = float(answered[i] and cluster_ids[i] == winner)
    return rewards


def _empo_loop(cluster_ids: list[int], group_ids: list[int], answered: list[bool]) -> tuple[list[float], list[float]]:
    rewards, se_n = [0.0] * len(cluster_ids), []
    for group in range(max(group_ids) + 1):
        members = [i for i, g in enumerate(group_ids) if g == group]
        sizes = Counter(cluster_ids[i] for i in members)
        for i in members:
            rewards[i] = sizes[cluster_ids[i]] / len(members) if answered[i] else 0.0
        entropy = -sum(c / len(members) * math.log(c / len(members)) for c in sizes.values())
        se_n.append(entropy / math.log(len(members)) if len(members) > 1 else 0.0)
    return rewards, se_n


@pytest.mark.parametrize("seed", range(5))
def test_ttrl_and_empo_match_a_plain_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.randint(0, 6, (40,), generator=generator).sort().values
    group_ids[:6] = torch.arange(6)  # every group present
    group_ids = group_ids.sort().values
    answered = torch.rand(40, generator=generator) > 0.25
    cluster_ids = torch.randint(0, 3, (40,), generator=generator)
    # Missing answers are singletons: give each its own id above the answered ones.
    cluster_ids = torch.where(answered, cluster_ids, 3 + torch.arange(40))
    rewards, _ = ttrl_rewards(cluster_ids, group_ids, 6, answered)
    assert rewards.tolist() == _ttrl_loop(cluster_ids.tolist(), group_ids.tolist(), answered.tolist())
    empo, keep, _ = empo_rewards(cluster_ids, group_ids, 6, answered, 0.2, 0.9)
    expected, se_n = _empo_loop(cluster_ids.tolist(), group_ids.tolist(), answered.tolist())
    torch.testing.assert_close(empo, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)
    assert keep.tolist() == [0.2 < s < 0.9 for s in se_n]


def test_empo_rewards_and_band_by_hand() -> None:
    # Group 0 (G = 4): clusters A, A, B and a missing answer (a singleton): shares 2/4, 2/4, 1/4 and r = 0 for
    # the missing one. Discrete p = (1/2, 1/4, 1/4): SE = 1.5 log 2, SE_n = 1.5 log 2 / log 4 = 0.75 -> kept.
    # Group 1 (G = 4): one cluster: r = 1 each, SE_n = 0 -> dropped (the band is open: 0 < SE_n).
    # Group 2 (G = 4): four clusters: r = 1/4 each, SE_n = 1 -> dropped (SE < log G, the authors' TRL rule).
    cluster_ids = torch.tensor([0, 0, 1, 2, 5, 5, 5, 5, 0, 1, 2, 3])
    group_ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    answered = torch.tensor([True, True, True, False] + [True] * 8)
    rewards, keep, metrics = empo_rewards(cluster_ids, group_ids, 3, answered)
    assert rewards.tolist() == [0.5, 0.5, 0.25, 0.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 0.25]
    assert keep.tolist() == [True, False, False]
    assert metrics["kept_frac"].item() == pytest.approx(1 / 3, abs=1e-7)
    assert metrics["se_n_mean"].item() == pytest.approx((0.75 + 0 + 1) / 3, abs=1e-6)
    # A band that includes 0 keeps group 1; one above 0.75 drops group 0.
    assert empo_rewards(cluster_ids, group_ids, 3, answered, -0.1, 0.8)[1].tolist() == [True, True, False]
    assert empo_rewards(cluster_ids, group_ids, 3, answered, 0.8, 1.01)[1].tolist() == [False, False, True]


def test_self_certainty_by_hand() -> None:
    # V = 4. p = (1/2, 1/4, 1/8, 1/8): KL(U || p) = (1/4) sum_v log((1/4) / p_v)
    #   = (1/4)(log 1/2 + log 1 + log 2 + log 2) = log 2 / 4 = 0.173287.
    # Via the summaries: mean_v log p_v = -(1 + 2 + 3 + 3) log 2 / 4 = -9/4 log 2; -log 4 + 9/4 log 2 = log 2 / 4.
    # Uniform p: KL = 0. Completion 0 = [p, uniform] -> log 2 / 8; completion 1 = [p] (then padding) -> log 2 / 4;
    # completion 2 has no token -> 0. Logits 2 log p at T = 2 are the same distributions.
    peaked = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    logits = torch.stack([peaked, torch.zeros(4), peaked, torch.full((4,), 50.0), peaked, peaked])  # [6, 4]
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    for temperature, scale in ((1.0, 1.0), (2.0, 2.0)):
        stats = token_distribution_stats(logits.double() * scale, temperature)
        rewards, metrics = self_certainty_rewards(stats.mean_logprob.view(3, 2), mask, vocab_size=4)
        torch.testing.assert_close(
            rewards, torch.tensor([math.log(2) / 8, math.log(2) / 4, 0.0], dtype=torch.float32), rtol=0, atol=1e-7
        )
        assert metrics["empty_completions"].item() == 1
    with pytest.raises(ValueError, match="vocab_size"):
        self_certainty_rewards(torch.zeros(1, 1), torch.ones(1, 1), vocab_size=1)


def test_rent_by_hand() -> None:
    # Row 0, mask [1, 1, 1, 1, 0]: all tokens -> -(0.4 + 0.2 + 0.6 + 1.0) / 4 = -0.55; last 2 -> -(0.6 + 1.0) / 2
    # = -0.8 (the padded 9.0 never counts). Row 1, mask [0, 1, 0, 1, 1]: all -> -(0.3 + 0.5 + 0.2) / 3 = -1/3;
    # last 2 -> -(0.5 + 0.2) / 2 = -0.35. Row 2 has no token -> 0. last_k = 10 > length = every token.
    entropy = torch.tensor([[0.4, 0.2, 0.6, 1.0, 9.0], [5.0, 0.3, 7.0, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    every, metrics = rent_rewards(entropy, mask)
    torch.testing.assert_close(every, torch.tensor([-0.55, -1 / 3, 0.0]), rtol=0, atol=1e-7)
    assert metrics["empty_completions"].item() == 1
    last_two, _ = rent_rewards(entropy, mask, last_k=2)
    torch.testing.assert_close(last_two, torch.tensor([-0.8, -0.35, 0.0]), rtol=0, atol=1e-7)
    torch.testing.assert_close(rent_rewards(entropy, mask, last_k=10)[0], every, rtol=0, atol=0)


@pytest.mark.parametrize("last_k", [None, 1, 3])
def test_rent_matches_a_plain_loop(last_k: int | None) -> None:
    generator = torch.Generator().manual_seed(7)
    entropy = torch.rand(6, 9, generator=generator, dtype=torch.float64) * 4
    mask = (torch.rand(6, 9, generator=generator) > 0.4).long()
    rewards, _ = rent_rewards(entropy, mask, last_k=last_k)
    for row in range(6):
        values = [entropy[row, t].item() for t in range(9) if mask[row, t]]
        values = values if last_k is None else values[-last_k:]
        expected = -sum(values) / len(values) if values else 0.0
        assert rewards[row].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_token_distribution_stats_match_the_dense_computation(dtype: torch.dtype, temperature: float) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 11, generator=generator, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    stats = token_distribution_stats(logits, temperature)
    z = logits.detach().double() / temperature  # [7, 11] the dense reference in float64
    log_probs = torch.log_softmax(z, dim=-1)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tolerance = 1e-12 if dtype == torch.float64 else 5e-6  # float32 rounding of values up to ~15
    for got, expected in (
        (stats.lse, torch.logsumexp(z, dim=-1)),
        (stats.entropy, -(log_probs.exp() * log_probs).sum(-1)),
        (stats.mean_logprob, log_probs.mean(-1)),
    ):
        assert got.dtype == expected_dtype and not got.requires_grad
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance)
    with pytest.raises(ValueError, match="temperature"):
        token_distribution_stats(logits, 0.0)
    with pytest.raises(ValueError, match=r"\[n, V\]"):
        token_distribution_stats(logits.view(1, 7, 11), 1.0)


def test_options_are_refused_at_construction_naming_the_option() -> None:
    assert LABEL_FREE_REWARDS.names() == ["empo", "rent", "self_certainty", "ttrl"]
    assert LABEL_FREE_REWARDS.get("empo")(0.1, 0.9) == EMPO(delta_lo=0.1, delta_hi=0.9)
    with pytest.raises(ValueError, match="delta_lo < delta_hi"):
        EMPO(delta_lo=0.5, delta_hi=0.5)
    with pytest.raises(ValueError, match="delta_lo < delta_hi"):
        EMPO(delta_lo=0.8, delta_hi=0.2)
    with pytest.raises(ValueError, match="delta_lo < 1"):
        EMPO(delta_lo=1.0, delta_hi=2.0)
    with pytest.raises(ValueError, match="delta_lo < delta_hi"):
        empo_rewards(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1, torch.ones(2).bool(), 1, 0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="last_k"):
            RENT(last_k=bad)
    assert RENT(last_k=4).last_k == 4
    with pytest.raises(ValueError, match="answered"):
        ttrl_rewards(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1, torch.ones(2))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_distribution_stats_equal_the_dense_ones_and_stay_in_chunks(chunk_size: int) -> None:
    from lit_gcpo.algorithms.token_distribution import hidden_distribution_stats, logits_distribution_stats

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(3, 5, 8), torch.randn(11, 8), torch.randn(11)
    logits = hidden @ weight.T + bias  # [3, 5, 11]
    dense = token_distribution_stats(logits.reshape(15, 11), temperature=0.5)
    from_hidden = hidden_distribution_stats(hidden, weight, 0.5, chunk_size, bias)
    from_logits = logits_distribution_stats(logits, 0.5, chunk_size)
    for stats in (from_hidden, from_logits):
        for name in ("lse", "entropy", "mean_logprob"):
            torch.testing.assert_close(getattr(stats, name), getattr(dense, name).view(3, 5), atol=1e-5, rtol=0)
    # a chunk never holds more than chunk_size rows of logits (never [N * T, V] at once)
    from lit_gcpo.algorithms.token_distribution import chunked_distribution_stats

    rows_seen: list[int] = []

    def logits_of(rows: slice) -> torch.Tensor:
        rows_seen.append(rows.stop - rows.start)
        return logits.reshape(15, 11)[rows]

    chunked_distribution_stats(logits_of, 15, 1.0, chunk_size)
    assert max(rows_seen) == min(chunk_size, 15) and sum(rows_seen) == 15
