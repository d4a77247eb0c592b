"""Paired comparison of training methods over seeds (issue 20's pre-registered analysis), as pure functions.

A run is one (testbed, method, seed) of ``benchmarks/compare_methods.py``, one record of
``benchmarks/results/compare_methods.jsonl``. For a given seed every method of a testbed sees the same prompt
order and the same validation prompts, so the unit of analysis is the seed: for a contrast ``a - b`` and an
outcome y, the paired differences are ``d_s = y_a,s - y_b,s`` over the seeds run by both arms. Records are
grouped by (testbed, design) (``design_of``), and within a group every method must have one ``config_sha``: runs
of different configs of one testbed and method are never pooled, runs of different designs never paired.

Outcomes: ``final_accuracy`` (the final greedy validation accuracy) and ``auc`` (the area under the
validation curve divided by its step span, i.e. the mean accuracy over the run, ``curve_areas``).

Per contrast, with n paired seeds:

- mean difference ``d_bar = (1/n) sum_s d_s``;
- a paired percentile-bootstrap 95% interval: resample the n seeds with replacement (10,000 times by default,
  seeded), take the 2.5th and 97.5th percentiles of the resampled ``d_bar`` (``bootstrap_interval``);
- the two-sided sign-flip permutation p of H0 "d_s is symmetric about 0": the share of sign patterns
  ``e in {-1, +1}^n`` with ``|sum_s e_s |d_s|| >= |sum_s d_s|``; exact over all 2^n patterns up to n = 16,
  beyond that ``(1 + hits) / (1 + B)`` over B = 100,000 random patterns (``sign_flip_p``);
- Holm's step-down adjustment over the contrast's family (``holm``);
- the smallest paired effect detectable at 80% power (two-sided alpha 0.05) given the observed std of the
  d_s (``minimum_detectable_effect``).

Families (``contrast_table``), per group and per outcome: PRIMARY ``gcpo_bot - rd_only``, ``gcpo_cd - rd_only``,
``seed_grpo_sf - grpo``, ``gcpo_bot - seed_grpo_sf`` (Holm over these 4); SECONDARY ``m - grpo`` for every other
method m of the group (Holm within that family).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

PRIMARY: tuple[tuple[str, str], ...] = (
    ("gcpo_bot", "rd_only"),
    ("gcpo_cd", "rd_only"),
    ("seed_grpo_sf", "grpo"),
    ("gcpo_bot", "seed_grpo_sf"),
)
BASELINE = "grpo"
METHOD_ORDER = ("grpo", "seed_grpo", "seed_grpo_sf", "gcpo_bot", "gcpo_cd", "rd_only")
OUTCOMES = ("final_accuracy", "auc")
EXACT_SIGN_FLIP_MAX = 16


def paired_differences(
    seeds_a: Sequence[int] | np.ndarray,
    values_a: Sequence[float] | np.ndarray,
    seeds_b: Sequence[int] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``(seeds, d)``: ``d_s = a_s - b_s`` over the seeds present in both arms, in increasing seed order.

    A seed that appears twice in one arm is an error (two runs of one seed cannot both be its pair).
    """
    arms = []
    for name, seeds, values in (("a", seeds_a, values_a), ("b", seeds_b, values_b)):
        seeds, values = np.asarray(seeds, dtype=int), np.asarray(values, dtype=float)
        if seeds.shape != values.shape or seeds.ndim != 1:
            raise ValueError(f"arm {name}: {seeds.shape[0]} seeds for {values.shape} values")
        unique, counts = np.unique(seeds, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"arm {name}: seed(s) {unique[counts > 1].tolist()} appear more than once")
        arms.append(dict(zip(seeds.tolist(), values.tolist(), strict=True)))
    common = sorted(set(arms[0]) & set(arms[1]))
    differences = np.array([arms[0][s] - arms[1][s] for s in common], dtype=float)
    return np.array(common, dtype=int), differences


def bootstrap_interval(
    differences: np.ndarray, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of the mean difference: the n seeds are resampled with replacement
    ``resamples`` times (``numpy.random.default_rng(seed)``), and the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` percentiles of the resampled means. NaN for fewer than 2 differences."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))  # [R, n]
    low, high = np.percentile(d[picks].mean(1), [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def sign_flip_p(
    differences: np.ndarray, permutations: int = 100_000, seed: int = 0, exact_max: int = EXACT_SIGN_FLIP_MAX
) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p of a zero mean paired difference, and whether it is exact.

    T(e) = |sum_s e_s |d_s||, T_obs = |sum_s d_s|. Up to ``exact_max`` differences: p = #{e : T(e) >= T_obs} / 2^n
    over all 2^n patterns (the smallest possible p is 2 / 2^n). Beyond: p = (1 + #{b : T(e_b) >= T_obs}) / (1 + B)
    over B = ``permutations`` uniform random patterns (seeded; the +1 counts the observed pattern, which keeps the
    random p valid). Ties are judged with a tolerance of 1e-9 sum_s |d_s| against summation-order rounding.
    NaN for no differences.
    """
    d = np.abs(np.asarray(differences, dtype=float))
    n = d.size
    if n == 0:
        return math.nan, True
    observed = abs(float(np.sum(differences)))
    tolerance = 1e-9 * float(d.sum())
    if n <= exact_max:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # [2^n, n], every pattern once
        totals = np.abs((2 * bits - 1) @ d)  # [2^n]
        return float(np.mean(totals >= observed - tolerance)), True
    signs = 2 * np.random.default_rng(seed).integers(0, 2, size=(permutations, n)) - 1  # [B, n]
    hits = int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (1 + hits) / (1 + permutations), False


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of m tests (family-wise error control).

    With the raw p sorted increasingly, p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),
    returned in the input's order. Monotone in the raw p and capped at 1.
    """
    p = np.asarray(p_values, dtype=float)
    if np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])  # (m - j + 1) p_(j), j = 1..m
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def curve_areas(curves: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """``[R]`` mean accuracy over the run of each validation curve ``[[step, accuracy], ...]`` (step 0 first).

    AUC = (1 / (s_K - s_0)) sum_k (s_k - s_{k-1}) (a_k + a_{k-1}) / 2, the trapezoid area divided by the step span,
    so a constant curve at a has AUC a. Every curve must have the same steps (curves of different grids weigh the
    run's phases differently and are not comparable): a difference is an error, as are fewer than 2 points and
    steps that do not increase.
    """
    if len(curves) == 0:
        return np.zeros(0)
    arrays = [np.asarray(curve, dtype=float) for curve in curves]
    grid = arrays[0][:, 0] if arrays[0].ndim == 2 and arrays[0].shape[1] == 2 else None
    if grid is None or grid.size < 2 or (np.diff(grid) <= 0).any():
        raise ValueError(f"a validation curve needs >= 2 [step, accuracy] points with increasing steps: {curves[0]}")
    for index, curve in enumerate(arrays):
        if curve.shape != arrays[0].shape or not np.array_equal(curve[:, 0], grid):
            raise ValueError(f"validation curve {index} has steps {curve[:, 0].tolist()}, curve 0 {grid.tolist()}")
    accuracies = np.stack([curve[:, 1] for curve in arrays])  # [R, K]
    return np.trapezoid(accuracies, grid, axis=1) / (grid[-1] - grid[0])


def minimum_detectable_effect(std: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean paired difference a two-sided paired test at level ``alpha`` detects with ``power``.

    delta = (t_{1 - alpha/2, n-1} + t_{power, n-1}) std / sqrt(n), the usual t approximation (it neglects the
    far rejection tail and uses the central t for the noncentral one; its exact power is 0.79 at n = 5 and 0.80 from
    n = 12). ``std`` is the sample std of the paired differences. NaN for n < 2.
    """
    if n < 2 or not math.isfinite(std):
        return math.nan
    quantiles = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(quantiles * std / math.sqrt(n))


def design_of(record: Mapping[str, Any]) -> str:
    """The design a run belongs to, shared by the runs of every method that may be paired with it.

    ``config_sha`` cannot be it: it hashes the resolved config with the method's weighting, so it differs between
    methods. A record's ``design_sha`` (a hash of the resolved config without seed, output paths and weighting) is
    the design when the runner writes one; otherwise the design is the config file and budget,
    ``"{config}, {steps} steps x {batch_size} prompts x G = {group_size}, val {val_size}"``, and ``group_records``
    refuses a method with two ``config_sha`` in one design (a config change the budget does not show).
    """
    if record.get("design_sha"):
        return str(record["design_sha"])
    return (
        f"{record['config']}, {record['steps']} steps x {record['batch_size']} prompts x G = {record['group_size']}, "
        f"val {record['val_size']}"
    )


def group_records(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The records by (testbed, ``design_of``), in order of first appearance; a method with runs of two
    ``config_sha`` in one group is an error (they would be pooled)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["testbed"], design_of(record)), []).append(record)
    for (testbed, design), members in groups.items():
        shas: dict[str, set[str]] = {}
        for record in members:
            shas.setdefault(record["method"], set()).add(record["config_sha"])
        for method, found in shas.items():
            if len(found) > 1:
                raise ValueError(
                    f"testbed {testbed!r}, design {design!r}: method {method!r} has runs of {len(found)} config_sha "
                    f"({', '.join(sorted(found))}); record a design_sha per run (a hash without the weighting) to "
                    "tell the designs apart, or keep one config per method and design in the file"
                )
    return groups


def method_outcomes(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {"seed", "start", "final_accuracy", "gain", "auc": [n]}}`` of one group's records, methods in
    ``METHOD_ORDER`` then alphabetically, seeds increasing. A (method, seed) recorded twice is an error; all the
    group's validation curves must share one step grid (``curve_areas``)."""
    try:
        areas = curve_areas([record["val_curve"] for record in records])
    except ValueError as error:
        first = records[0]
        raise ValueError(f"testbed {first['testbed']!r}, design {design_of(first)!r}: {error}") from error
    by_method: dict[str, list[tuple[int, float, float, float]]] = {}
    for record, area in zip(records, areas, strict=True):
        entry = (int(record["seed"]), float(record["start_val_accuracy"]), float(record["final_val_accuracy"]), area)
        by_method.setdefault(record["method"], []).append(entry)
    ranked = sorted(by_method, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    outcomes = {}
    for method in ranked:
        rows = np.array(sorted(by_method[method]), dtype=float)  # [n, 4]: seed, start, final, auc
        seeds = rows[:, 0].astype(int)
        if np.unique(seeds).size != seeds.size:
            raise ValueError(f"method {method!r}: a seed is recorded more than once ({seeds.tolist()})")
        outcomes[method] = {
            "seed": seeds,
            "start": rows[:, 1],
            "final_accuracy": rows[:, 2],
            "gain": rows[:, 2] - rows[:, 1],
            "auc": rows[:, 3],
        }
    return outcomes


@dataclass(frozen=True)
class ContrastRow:
    """One paired contrast ``treatment - control`` of one group and outcome (module docstring for the formulas).

    ``std`` is the sample std (ddof 1) of the paired differences, ``exact`` whether ``p`` enumerates all sign
    patterns, ``p_holm`` the Holm-adjusted p within ``family``; NaN where fewer than 2 seeds pair.
    """

    testbed: str
    design: str
    family: str
    outcome: str
    treatment: str
    control: str
    n: int
    mean: float
    std: float
    low: float
    high: float
    p: float
    exact: bool
    p_holm: float
    mde: float

    @property
    def name(self) -> str:
        return f"{self.treatment} - {self.control}"


def contrast_table(
    records: Sequence[Mapping[str, Any]], resamples: int = 10_000, permutations: int = 100_000, seed: int = 0
) -> list[ContrastRow]:
    """The contrast rows of every (testbed, design) group: per outcome the PRIMARY family, then the SECONDARY.

    Every pre-registered primary contrast gets a row even when an arm is missing; a contrast with fewer than 2
    paired seeds has NaN statistics and enters Holm's family as p = 1, so the correction stays that of the whole
    pre-registered family. Every contrast uses the bootstrap seed ``seed``: contrasts over the same seeds resample
    the same seeds.
    """
    rows = []
    for (testbed, design), members in group_records(records).items():
        outcomes = method_outcomes(members)
        secondary = tuple((m, BASELINE) for m in outcomes if m != BASELINE)
        for outcome in OUTCOMES:
            for family, contrasts in (("primary", PRIMARY), ("secondary", secondary)):
                computed = [_contrast(outcomes, a, b, outcome, resamples, permutations, seed) for a, b in contrasts]
                adjusted = holm([1.0 if math.isnan(c["p"]) else c["p"] for c in computed]) if computed else []
                for (a, b), values, p_holm in zip(contrasts, computed, adjusted, strict=True):
                    p_holm = math.nan if math.isnan(values["p"]) else float(p_holm)
                    rows.append(ContrastRow(testbed, design, family, outcome, a, b, p_holm=p_holm, **values))
    return rows


def _contrast(
    outcomes: Mapping[str, Mapping[str, np.ndarray]],
    treatment: str,
    control: str,
    outcome: str,
    resamples: int,
    permutations: int,
    seed: int,
) -> dict[str, Any]:
    empty = {"seed": np.zeros(0, dtype=int), outcome: np.zeros(0)}
    a, b = outcomes.get(treatment, empty), outcomes.get(control, empty)
    return paired_contrast(a["seed"], a[outcome], b["seed"], b[outcome], resamples, permutations, seed)


def paired_contrast(
    seeds_a: Sequence[int] | np.ndarray,
    values_a: Sequence[float] | np.ndarray,
    seeds_b: Sequence[int] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
    resamples: int = 10_000,
    permutations: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The statistics of one paired contrast ``a - b`` over the seeds both arms ran (module docstring):
    ``{"n", "mean", "std", "low", "high", "p", "exact", "mde"}``; with fewer than 2 paired seeds all NaN but ``n``,
    ``exact`` and ``mean`` (the one difference, if any)."""
    _, d = paired_differences(seeds_a, values_a, seeds_b, values_b)
    if d.size < 2:
        mean = float(d.mean()) if d.size else math.nan
        nan = math.nan
        return {"n": d.size, "mean": mean, "std": nan, "low": nan, "high": nan, "p": nan, "exact": True, "mde": nan}
    low, high = bootstrap_interval(d, resamples, seed)
    p, exact = sign_flip_p(d, permutations, seed)
    std = float(d.std(ddof=1))
    mean = float(d.mean())
    mde = minimum_detectable_effect(std, d.size)
    return {"n": d.size, "mean": mean, "std": std, "low": low, "high": high, "p": p, "exact": exact, "mde": mde}
