"""The paired statistics of the method comparison (lit_gcpo.evaluation.comparison): hand-derived cases, and independent
computations (an exact dynamic programme over sign patterns, the full bootstrap distribution, Holm's rejection
rule, the noncentral t power)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from lit_gcpo.evaluation.comparison import (
    bootstrap_interval,
    contrast_table,
    curve_areas,
    design_of,
    group_records,
    holm,
    method_outcomes,
    minimum_detectable_effect,
    paired_contrast,
    paired_differences,
    sign_flip_p,
)


def test_paired_differences_keeps_common_seeds_in_order_and_rejects_duplicates() -> None:
    # seeds 2 and 3 are in both arms: d_2 = 0.2 - 0.0, d_3 = 0.5 - 0.25; seeds 1 and 4 have no pair
    seeds, d = paired_differences([3, 1, 2], [0.5, 0.1, 0.2], [2, 3, 4], [0.0, 0.25, 9.0])
    assert seeds.tolist() == [2, 3]
    np.testing.assert_allclose(d, [0.2, 0.25], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"arm b: seed\(s\) \[4\] appear more than once"):
        paired_differences([1, 4], [0.1, 0.2], [4, 4], [0.3, 0.4])


def _exact_sign_flip_p(units: list[int]) -> float:
    """Independent exact p for integer differences: count the 2^n signed sums by a dynamic programme."""
    counts = Counter({0: 1})
    for unit in units:
        step: Counter[int] = Counter()
        for total, ways in counts.items():
            step[total + abs(unit)] += ways
            step[total - abs(unit)] += ways
        counts = step
    observed = abs(sum(units))
    return sum(w for total, w in counts.items() if abs(total) >= observed) / 2 ** len(units)


def test_sign_flip_p_hand_values() -> None:
    # 5 differences of one sign: only the two all-same-sign patterns reach |mean| = 0.018, p = 2/32.
    assert sign_flip_p(np.array([0.01, 0.02, 0.03, 0.01, 0.02])) == (pytest.approx(2 / 32), True)
    # |d| = (1, 2, 3, 1, 2) x 0.01 sum to 9 (odd), so no pattern has |sum| < 1 = the observed |sum|: p = 1.
    assert sign_flip_p(np.array([0.01, -0.02, 0.03, 0.01, -0.02]))[0] == pytest.approx(1.0)
    # (3, 1, 1) x 0.01 observed sum 5: patterns with |sum| >= 5 are +++ and --- only: p = 2/8.
    assert sign_flip_p(np.array([0.03, 0.01, 0.01]))[0] == pytest.approx(0.25)
    # (1, 2, 2, 4) x 0.01 observed +5 (signs + - + +): of the 16 patterns, |sum| >= 5 for 9, 5, 5, 7 with +4 and
    # their mirrors with -4, so 8 / 16.
    assert sign_flip_p(np.array([0.01, -0.02, 0.02, 0.04]))[0] == pytest.approx(0.5)


def test_sign_flip_p_exact_up_to_16_and_random_beyond_against_a_dynamic_programme() -> None:
    rng = np.random.default_rng(3)
    units = (rng.integers(1, 10, size=16) * rng.choice([-1, 1], size=16, p=[0.3, 0.7])).tolist()
    p, exact = sign_flip_p(np.array(units) * 0.01)
    assert exact and p == pytest.approx(_exact_sign_flip_p(units), abs=1e-12)
    units = (rng.integers(1, 10, size=20) * rng.choice([-1, 1], size=20, p=[0.35, 0.65])).tolist()
    truth = _exact_sign_flip_p(units)
    p, exact = sign_flip_p(np.array(units) * 0.01, permutations=100_000, seed=1)
    assert not exact and 0.01 < truth < 0.99  # a p where the Monte Carlo error is visible
    assert abs(p - truth) < 4.5 * math.sqrt(truth * (1 - truth) / 100_000)  # within 4.5 binomial SE (~0.007)
    # 30 positive differences: a random pattern reaches the observed |sum| with probability 2 / 2^30, so none of
    # the 100,000 does and the +1 correction gives p = 1 / 100,001 (not 0).
    assert sign_flip_p(np.full(30, 0.01)) == (pytest.approx(1 / 100_001, rel=1e-12), False)


def test_bootstrap_interval_hand_values_and_full_bootstrap_distribution() -> None:
    assert bootstrap_interval(np.full(5, 0.02)) == pytest.approx((0.02, 0.02))
    # d = (0, 1): the resampled mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so about 2,500 of 10,000 draws
    # are 0 and as many are 1: the 2.5th and 97.5th percentiles are exactly 0 and 1.
    assert bootstrap_interval(np.array([0.0, 1.0])) == (0.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([0.3])))
    # all 5^5 equally likely resamples of 5 seeds: the random interval's ends lie between the exact distribution's
    # 2nd and 3rd (97th and 98th) percentiles (10,000 draws put the 2.5% point within +-0.0016 in probability).
    d = np.array([-0.02, 0.0, 0.01, 0.03, 0.05])
    exact = np.array([d[list(picks)].mean() for picks in itertools.product(range(5), repeat=5)])
    low, high = bootstrap_interval(d, resamples=10_000, seed=7)
    assert np.quantile(exact, 0.02) <= low <= np.quantile(exact, 0.03)
    assert np.quantile(exact, 0.97) <= high <= np.quantile(exact, 0.98)
    assert bootstrap_interval(d, seed=7) == (low, high)  # seeded


def _holm_by_rejection(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as a rule: reject H_(i) while p_(j) <= alpha / (m - j + 1) for every j <= i."""
    rejected = np.zeros(p.size, dtype=bool)
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        if p[index] > alpha / (p.size - rank):
            break
        rejected[index] = True
    return rejected


def test_holm_hand_values_cap_and_rejection_rule() -> None:
    # sorted p: 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, 1 x 0.04 = 0.04,
    # made monotone: 0.02, 0.03, 0.06, 0.06; back in input order (0.01, 0.04, 0.03, 0.005):
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    # 2 x 0.6 = 1.2 is capped at 1, and 0.7 is raised to it by monotonicity
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(holm([0.2]), [0.2], rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.random(6) ** 3
        adjusted = holm(p)
        assert (adjusted >= p).all() and (adjusted <= 1).all()
        order = np.argsort(p)
        assert (np.diff(adjusted[order]) >= 0).all()  # monotone in the raw p
        for alpha in (0.01, 0.05, 0.1, 0.2):
            np.testing.assert_array_equal(adjusted <= alpha, _holm_by_rejection(p, alpha))
    with pytest.raises(ValueError, match="p-values"):
        holm([0.1, math.nan])


def test_curve_areas_hand_values_and_grid_errors() -> None:
    # trapezoids: 10 x (0.2 + 0.4) / 2 = 3, 20 x (0.4 + 0.4) / 2 = 8; 11 over the span 30 = 0.36667
    areas = curve_areas([[[0, 0.2], [10, 0.4], [30, 0.4]], [[0, 0.5], [10, 0.5], [30, 0.5]]])
    np.testing.assert_allclose(areas, [11 / 30, 0.5], rtol=1e-12)
    # a grid from step 5: 10 x (0.1 + 0.3) / 2 = 2 over the span 10 = 0.2
    np.testing.assert_allclose(curve_areas([[[5, 0.1], [15, 0.3]]]), [0.2], rtol=1e-12)
    with pytest.raises(ValueError, match="curve 1 has steps"):
        curve_areas([[[0, 0.2], [10, 0.4]], [[0, 0.2], [20, 0.4]]])
    with pytest.raises(ValueError, match=">= 2"):
        curve_areas([[[0, 0.2]]])


def test_minimum_detectable_effect_hand_value_and_noncentral_power() -> None:
    # t tables: t_{0.975, 11} = 2.2010, t_{0.80, 11} = 0.8755; (2.2010 + 0.8755) x 0.05 / sqrt(12) = 0.044406
    assert minimum_detectable_effect(0.05, 12) == pytest.approx(3.0765 * 0.05 / math.sqrt(12), rel=2e-5)
    for n in (12, 16, 30):
        effect = minimum_detectable_effect(1.0, n) * math.sqrt(n)  # noncentrality of the paired t statistic
        critical = stats.t.ppf(0.975, n - 1)
        power = stats.nct.sf(critical, n - 1, effect) + stats.nct.cdf(-critical, n - 1, effect)
        assert power == pytest.approx(0.80, abs=0.002)
    assert math.isnan(minimum_detectable_effect(0.05, 1))


def test_paired_contrast_hand_values() -> None:
    # seeds 0, 1, 2 paired (seed 3 of arm a has no pair): d = 1, 2, 3; mean 2, std 1. Sign flips of (1, 2, 3): only
    # all + and all - reach |sum| = 6, so p = 2 / 8. MDE = (t_{0.975, 2} + t_{0.80, 2}) / sqrt(3)
    # = (4.3027 + 1.0607) / 1.7321 = 3.0966.
    stats_ = paired_contrast([0, 1, 2, 3], [11.0, 12.0, 13.0, 9.0], [2, 1, 0], [10.0, 10.0, 10.0])
    assert (stats_["n"], stats_["exact"]) == (3, True)
    assert (stats_["mean"], stats_["std"], stats_["p"]) == pytest.approx((2.0, 1.0, 0.25))
    assert stats_["mde"] == pytest.approx(3.0966, abs=2e-4)
    assert 1.0 <= stats_["low"] <= stats_["high"] <= 3.0  # bootstrap means of resampled (1, 2, 3)
    one = paired_contrast([0], [0.5], [0], [0.25])
    assert one["n"] == 1 and one["mean"] == 0.25 and math.isnan(one["p"]) and math.isnan(one["mde"])


FINALS = {  # seeds 0..4 (gcpo_cd: 0..2)
    "grpo": [0.30, 0.32, 0.34, 0.31, 0.33],
    "rd_only": [0.31, 0.30, 0.35, 0.33, 0.32],
    "gcpo_bot": [0.34, 0.33, 0.38, 0.36, 0.35],
    "gcpo_cd": [0.30, 0.31, 0.33],
    "seed_grpo_sf": [0.33, 0.35, 0.36, 0.32, 0.35],
}


DESIGN = "c.yaml, 20 steps x 16 prompts x G = 8, val 300"


def _records() -> list[dict]:
    # curve (0, 0.2), (10, f), (20, f): AUC = (10 (0.2 + f) / 2 + 10 f) / 20 = (0.2 + 3 f) / 4, so every AUC
    # difference is 0.75 times the final-accuracy difference and has the same sign-flip p. As the runner does, the
    # config_sha differs between methods (it hashes the weighting); the design is the config and budget.
    return [
        {"testbed": "arithmetic", "config_sha": f"{method}-sha", "method": method, "seed": seed,
         "config": "c.yaml", "steps": 20, "batch_size": 16, "group_size": 8, "val_size": 300,
         "start_val_accuracy": 0.2, "final_val_accuracy": final, "val_curve": [[0, 0.2], [10, final], [20, final]]}
        for method, finals in FINALS.items()
        for seed, final in enumerate(finals)
    ]  # fmt: skip


def test_group_records_by_design_never_pooling_two_configs_of_a_method() -> None:
    records = _records()
    assert design_of(records[0]) == DESIGN
    assert list(group_records(records)) == [("arithmetic", DESIGN)]  # 5 methods, 5 config_sha, one design
    # a design_sha recorded by the runner separates designs that share a budget
    tagged = [{**r, "design_sha": "d1" if r["seed"] < 2 else "d2"} for r in records]
    assert [len(m) for m in group_records(tagged).values()] == [10, 13]
    changed = [*records, {**records[0], "seed": 9, "config_sha": "grpo-new-default"}]
    with pytest.raises(ValueError, match="method 'grpo' has runs of 2 config_sha"):
        group_records(changed)


def test_method_outcomes_orders_methods_and_computes_gain_and_auc() -> None:
    outcomes = method_outcomes(_records())
    assert list(outcomes) == ["grpo", "seed_grpo_sf", "gcpo_bot", "gcpo_cd", "rd_only"]
    np.testing.assert_allclose(outcomes["gcpo_cd"]["gain"], [0.10, 0.11, 0.13], rtol=1e-12)
    np.testing.assert_allclose(outcomes["gcpo_cd"]["auc"], [0.275, 0.2825, 0.2975], rtol=1e-12)
    duplicated = [*_records(), {**_records()[0], "final_val_accuracy": 0.9}]
    with pytest.raises(ValueError, match="'grpo': a seed is recorded more than once"):
        method_outcomes(duplicated)
    shifted = [*_records()[:-1], {**_records()[-1], "val_curve": [[0, 0.2], [10, 0.3], [25, 0.3]]}]
    with pytest.raises(ValueError, match=r"testbed 'arithmetic', design 'c\.yaml, 20 steps"):
        method_outcomes(shifted)


def test_contrast_table_families_hand_values() -> None:
    # A second design (40 steps) with a gcpo_bot run of seed 0: never pooled with the first (no duplicate error).
    extra = {**_records()[0], "config_sha": "x", "method": "gcpo_bot", "steps": 40}
    rows = contrast_table([*_records(), extra], resamples=2000)
    table = {(r.design, r.family, r.outcome, r.name): r for r in rows}
    final = {r.name: r for r in rows if (r.design, r.family, r.outcome) == (DESIGN, "primary", "final_accuracy")}
    assert list(final) == ["gcpo_bot - rd_only", "gcpo_cd - rd_only", "seed_grpo_sf - grpo", "gcpo_bot - seed_grpo_sf"]
    # gcpo_bot - rd_only = 0.03 on all 5 seeds: p = 2/32, interval [0.03, 0.03], std 0 so MDE 0
    row = final["gcpo_bot - rd_only"]
    assert (row.n, row.mean, row.p, row.exact) == (5, pytest.approx(0.03), pytest.approx(0.0625), True)
    assert (row.low, row.high, row.mde) == (pytest.approx(0.03), pytest.approx(0.03), pytest.approx(0, abs=1e-12))
    # gcpo_cd - rd_only on the 3 common seeds: (-1, 1, -2) x 0.01, observed |sum| 2; of the 8 sums of +-1 +-1 +-2
    # (4, 0, 2, -2, 2, -2, 0, -4) six reach 2: p = 0.75
    row = final["gcpo_cd - rd_only"]
    assert (row.n, row.mean, row.p) == (3, pytest.approx(-0.02 / 3), pytest.approx(0.75))
    # seed_grpo_sf - grpo = (3, 3, 2, 1, 2) x 0.01: mean 0.022, all positive: p = 2/32; deviations
    # (8, 8, -2, -12, -2) x 0.001, sum of squares 280e-6, std = sqrt(70e-6) = 0.0083666;
    # MDE = (t_{0.975, 4} + t_{0.8, 4}) std / sqrt(5) = (2.7764 + 0.9410) x 0.0083666 / 2.2361 = 0.013909
    row = final["seed_grpo_sf - grpo"]
    assert (row.mean, row.p, row.std) == (pytest.approx(0.022), pytest.approx(0.0625), pytest.approx(math.sqrt(7e-5)))
    assert row.mde == pytest.approx(3.7174 * math.sqrt(7e-5) / math.sqrt(5), rel=1e-4)
    assert (row.low, row.high) == pytest.approx(bootstrap_interval(np.array([0.03, 0.03, 0.02, 0.01, 0.02]), 2000))
    # gcpo_bot - seed_grpo_sf = (1, -2, 2, 4, 0) x 0.01, observed 5; 8 of the 16 patterns of (1, 2, 2, 4) reach 5
    assert final["gcpo_bot - seed_grpo_sf"].p == pytest.approx(0.5)
    # Holm over (0.0625, 0.75, 0.0625, 0.5): sorted x (4, 3, 2, 1) = 0.25, 0.1875, 1.0, 0.75 -> 0.25, 0.25, 1, 1
    np.testing.assert_allclose([r.p_holm for r in final.values()], [0.25, 1.0, 0.25, 1.0], rtol=1e-12)
    # secondary: every method - grpo. gcpo_bot - grpo (4, 1, 4, 5, 2) x 0.01 all positive: 0.0625; gcpo_cd - grpo
    # (0, -1, -1): 2 of the 4 patterns of (1, 1) reach 2, p = 0.5; rd_only - grpo (1, -2, 1, 2, -1): odd total 7,
    # every pattern reaches 1, p = 1. Holm over (0.0625, 0.0625, 0.5, 1): 0.25, 0.25, 1, 1.
    secondary = [r for r in rows if (r.design, r.family, r.outcome) == (DESIGN, "secondary", "final_accuracy")]
    assert [r.name for r in secondary] == ["seed_grpo_sf - grpo", "gcpo_bot - grpo", "gcpo_cd - grpo", "rd_only - grpo"]
    np.testing.assert_allclose([r.p for r in secondary], [0.0625, 0.0625, 0.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose([r.p_holm for r in secondary], [0.25, 0.25, 1.0, 1.0], rtol=1e-12)
    # AUC: 0.75 x every final difference, same p
    for (design, family, outcome, name), row in table.items():
        if design == DESIGN and outcome == "auc":
            twin = table[(design, family, "final_accuracy", name)]
            assert (row.mean, row.p, row.p_holm) == (pytest.approx(0.75 * twin.mean), twin.p, twin.p_holm)
    # the 40-step design: only one run, every primary contrast is empty (NaN, no Holm p)
    alone = [r for r in rows if r.design != DESIGN]
    assert {r.family for r in alone} == {"primary", "secondary"} and all(r.n == 0 for r in alone)
    assert all(math.isnan(r.p) and math.isnan(r.p_holm) for r in alone)
