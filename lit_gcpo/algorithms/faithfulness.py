"""Does an uncertainty signal track the variance of the policy gradient? (METHODS.md §6), as library functions.

GCPO's central claim is that geometry-aware signals track the variance of the policy gradient better than
semantic entropy. For a prompt with per-completion gradients ``g_i = A_i grad_theta sum_t m log pi(o_i,t)``:

    V = 1 / (G (G - 1)) sum_i |g_i - g_bar|^2

``completion_gradients`` computes the g_i of chosen completions (one backward each, padding cut off so no
completion's gradient leaks into another's), ``gradient_variance`` the V of every group, and ``faithfulness``
the Spearman correlation of V with each signal:

- over all prompts: read with care, a group without reward spread has A = 0, hence V = 0 exactly, so any signal
  separating RD = 0 from RD > 0 correlates with V for that reason alone (RD does by construction);
- over the prompts with RD > 0: the test of the claim;
- within strata among those: ranks centred in every stratum, then correlated; does the signal track V beyond the
  reward pattern? For 0/1 rewards pass ``strata`` = k, the number of correct completions (``correct_counts``),
  which fixes the group's advantages. Without it the strata are the values of RD, which is symmetric: RD merges
  k and G - k correct, whose advantages are mirror images, not equal;
- over the prompts with RD > 0, controlling for completion length: the partial Spearman correlation
  (``partial_spearman``: ranks, the ranked length regressed out of both, residuals correlated);

each with a percentile-bootstrap 95% interval over prompts, and beside the control ``length`` (the mean
completion length: longer completions have larger gradients). A signal that does no better than length is no
evidence for geometry. Every signal and statistic is bootstrapped over the same resampled prompts, and
``correlation_differences`` gives the interval of the difference of two signals' correlations over those
prompts: "BoT tracks V better than SE" is read from that interval, not from two overlapping ones.

``weight_ratio_by_k`` compares a weighting's weights on noisy and clean prompts of equal k (the noisy testbed's
coin-flip groups and its clean groups differ in k, and RD-driven weights differ with k alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

LENGTH = "length"

LogprobFn = Callable[[Tensor, Tensor, int], Tensor]
"""``(input_ids [1, T], attention_mask [1, T], completion_length) -> [1, L]`` sampled-token log-probs."""


def completion_gradients(
    logprobs_of: LogprobFn,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    params: Sequence[torch.nn.Parameter],
    rows: Sequence[int],
) -> Tensor:
    """``[len(rows), D]`` float64 ``g_i = A_i grad sum_t m log pi(o_i,t)`` over the flattened ``params``.

    ``input_ids``/``attention_mask`` are ``[N, P + L]`` (prompt left-padded, completion right-padded),
    ``completion_mask`` ``[N, L]``. Each row runs alone with its padding cut off; a row with A_i = 0 or an
    empty completion is zero without a backward.
    """
    dim = sum(p.numel() for p in params)
    grads = torch.zeros(len(rows), dim, dtype=torch.float64)  # [n, D]
    prompt_length = input_ids.shape[1] - completion_mask.shape[1]
    for position, row in enumerate(rows):
        length = int(completion_mask[row].sum())
        if float(advantages[row]) == 0.0 or length == 0:
            continue
        attention = attention_mask[row, : prompt_length + length]
        first = int(attention.nonzero()[0])  # drop the prompt's left padding
        ids = input_ids[row : row + 1, first : prompt_length + length]  # [1, P' + L']
        logprobs = logprobs_of(ids, attention[None, first:], length)  # [1, L']
        parts = torch.autograd.grad(logprobs.sum(), list(params), allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(parts, params, strict=True)]
        )
        grads[position] = flat.double() * float(advantages[row])
    return grads


def gradient_variance(grads: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """``[B]`` V = 1 / (G (G - 1)) sum_i |g_i - g_bar|^2 of each group from its completions' ``grads [N, D]``.

    Uses ``sum_i |g_i - g_bar|^2 = sum_i |g_i|^2 - G |g_bar|^2`` (float64); groups of fewer than two get 0.
    """
    grads = grads.double()
    sizes = torch.bincount(group_ids, minlength=num_groups)[:num_groups].double()  # [B]
    sums = grads.new_zeros(num_groups, grads.shape[1]).index_add_(0, group_ids, grads)  # [B, D]
    squares = grads.new_zeros(num_groups).index_add_(0, group_ids, (grads * grads).sum(-1))  # [B]
    spread = squares - (sums * sums).sum(-1) / sizes.clamp(min=1.0)  # [B] = sum_i |g_i - g_bar|^2
    pairs = sizes * (sizes - 1)
    return torch.where(pairs > 0, spread.clamp(min=0.0) / pairs.clamp(min=1.0), 0.0)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho; NaN when either input is constant (no rank correlation exists)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def stratified_spearman(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> float:
    """Spearman rho within strata: the ranks of x and y centred in every stratum, then correlated (NaN when
    nothing varies within the strata)."""
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    for value in np.unique(strata):
        members = strata == value
        rank_x[members] -= rank_x[members].mean()
        rank_y[members] -= rank_y[members].mean()
    scale = math.sqrt(float((rank_x**2).sum() * (rank_y**2).sum()))
    return float((rank_x * rank_y).sum() / scale) if scale > 0 else math.nan


def partial_spearman(x: np.ndarray, y: np.ndarray, control: np.ndarray) -> float:
    """Spearman correlation of x and y controlling for ``control`` (e.g. completion length).

    Rank all three (average ranks for ties), regress the ranks of x and of y by least squares on
    ``[1, rank(control)]``, and correlate the residuals: rho_xy.z = sum e_x e_y / sqrt(sum e_x^2 sum e_y^2). This
    equals (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2) (1 - r_yz^2)) of the Spearman r's. NaN for fewer than 3 prompts
    or when a residual vanishes (x or y a monotone function of the control, or constant).
    """
    if len(x) < 3:
        return math.nan
    ranks = np.column_stack([stats.rankdata(values) for values in (x, y, control)])  # [P, 3]
    design = np.column_stack([np.ones(len(x)), ranks[:, 2]])  # [P, 2]
    coefficients = np.linalg.lstsq(design, ranks[:, :2], rcond=None)[0]  # [2, 2]
    residuals = ranks[:, :2] - design @ coefficients  # [P, 2], centred (the design has an intercept)
    squares = (residuals**2).sum(0)  # [2]
    if (squares <= 1e-12 * ((ranks[:, :2] - ranks[:, :2].mean(0)) ** 2).sum(0)).any():
        return math.nan
    return float((residuals[:, 0] * residuals[:, 1]).sum() / math.sqrt(squares[0] * squares[1]))


def correct_counts(rewards: Tensor | np.ndarray, group_ids: Tensor | np.ndarray, num_groups: int) -> np.ndarray:
    """``[B]`` k, the number of completions with reward 1 in each group, for 0/1 rewards: the stratum that fixes a
    group's advantages (RD does not: k and G - k have the same RD). Non-finite rewards are left out, as
    ``reward_dispersion`` does; a finite reward other than 0 or 1 is an error."""
    values, groups = _numpy(rewards), _numpy(group_ids).astype(int)
    finite = np.isfinite(values)
    if not np.isin(values[finite], (0.0, 1.0)).all():
        raise ValueError("k (the number of correct completions) is defined for 0/1 rewards only")
    return np.bincount(groups[finite], weights=values[finite], minlength=num_groups)[:num_groups].astype(int)


@dataclass(frozen=True)
class Interval:
    """A statistic and its percentile-bootstrap 95% interval (NaN where undefined)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return "n/a" if math.isnan(self.value) else f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap(statistic: Callable[..., float], samples: tuple[np.ndarray, ...], resamples: int, seed: int) -> Interval:
    """``statistic(*samples)`` and a paired percentile-bootstrap 95% interval over the rows of ``samples``
    (resamples where the statistic is undefined are left out of the percentiles)."""
    value = statistic(*samples)
    if len(samples[0]) < 3 or math.isnan(value):
        return Interval(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    n = len(samples[0])
    draws = np.array([statistic(*(s[picks] for s in samples)) for picks in rng.integers(0, n, size=(resamples, n))])
    if np.isnan(draws).all():
        return Interval(value, math.nan, math.nan)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return Interval(value, float(low), float(high))


@dataclass(frozen=True)
class Faithfulness:
    """One signal's Spearman correlation with V: over all prompts, over those with RD > 0, within strata (k, or
    RD) among those, and over those controlling for completion length (partial Spearman)."""

    all_prompts: Interval
    spread_prompts: Interval
    within_strata: Interval
    partial_length: Interval


@dataclass(frozen=True)
class Difference:
    """``rho(a, V) - rho(b, V)`` over the prompts with RD > 0 and within strata among those, each with a paired
    bootstrap interval (both correlations on the same resampled prompts)."""

    spread_prompts: Interval
    within_strata: Interval


def faithfulness(
    signals: Mapping[str, Tensor | np.ndarray],
    variance: Tensor | np.ndarray,
    rd: Tensor | np.ndarray,
    lengths: Tensor | np.ndarray,
    *,
    strata: Tensor | np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Faithfulness]:
    """Correlations of every signal (and of the ``length`` control) with the gradient variance.

    Args:
        signals: ``[P]`` per-prompt values by name (e.g. ``se``, ``cd``, ``bot``, ``rd``, ``u_c``).
        variance: ``[P]`` gradient variance V of each prompt (``gradient_variance``).
        rd: ``[P]`` reward dispersion; the prompts with RD > 0 are those with spread.
        lengths: ``[P]`` mean completion length of each prompt, the control reported as ``length`` and the one
            the partial correlation controls for.
        strata: ``[P]`` stratum of each prompt: for 0/1 rewards k, the number of correct completions
            (``correct_counts``); default the value of RD, which merges k and G - k.
        resamples: bootstrap resamples.
        seed: seeds the bootstrap; every signal and statistic of one prompt set resamples the same prompts.
    """
    named, v, spread, strata_spread = _prepared(signals, variance, rd, lengths, strata)
    length = named[LENGTH][spread]
    return {
        name: Faithfulness(
            bootstrap(spearman, (x, v), resamples, seed),
            bootstrap(spearman, (x[spread], v[spread]), resamples, seed),
            bootstrap(stratified_spearman, (x[spread], v[spread], strata_spread), resamples, seed),
            bootstrap(partial_spearman, (x[spread], v[spread], length), resamples, seed),
        )
        for name, x in named.items()
    }


def correlation_differences(
    signals: Mapping[str, Tensor | np.ndarray],
    variance: Tensor | np.ndarray,
    rd: Tensor | np.ndarray,
    lengths: Tensor | np.ndarray,
    pairs: Sequence[tuple[str, str]],
    *,
    strata: Tensor | np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Difference]:
    """``{"a - b": Difference}``: for every pair of names (signals or ``length``), the difference of their Spearman
    correlations with V on the prompts with RD > 0 and within strata, with a paired bootstrap interval: each
    resample draws one set of prompts and both correlations are computed on it (arguments as ``faithfulness``; the
    same ``seed`` resamples the same prompts as ``faithfulness``)."""
    named, v, spread, strata_spread = _prepared(signals, variance, rd, lengths, strata)
    results = {}
    for first, second in pairs:
        a, b = named[first][spread], named[second][spread]
        results[f"{first} - {second}"] = Difference(
            bootstrap(_difference(spearman), (a, b, v[spread]), resamples, seed),
            bootstrap(_difference(stratified_spearman), (a, b, v[spread], strata_spread), resamples, seed),
        )
    return results


def _difference(statistic: Callable[..., float]) -> Callable[..., float]:
    """``(a, b, v, *rest) -> statistic(a, v, *rest) - statistic(b, v, *rest)``."""

    def difference(first: np.ndarray, second: np.ndarray, v: np.ndarray, *rest: np.ndarray) -> float:
        return statistic(first, v, *rest) - statistic(second, v, *rest)

    return difference


def _prepared(
    signals: Mapping[str, Tensor | np.ndarray],
    variance: Tensor | np.ndarray,
    rd: Tensor | np.ndarray,
    lengths: Tensor | np.ndarray,
    strata: Tensor | np.ndarray | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Signals with ``length`` by name, V, the RD > 0 mask and the strata of those prompts (checked shapes)."""
    v, dispersion = _numpy(variance), _numpy(rd)
    spread = dispersion > 0
    labels = np.round(dispersion, 6) if strata is None else _numpy(strata)
    named = {**{name: _numpy(value) for name, value in signals.items()}, LENGTH: _numpy(lengths)}
    for name, x in {**named, "rd": dispersion, "strata": labels}.items():
        if x.shape != v.shape:
            raise ValueError(f"signal {name!r} has shape {x.shape}, variance has {v.shape}")
    return named, v, spread, labels[spread]


@dataclass(frozen=True)
class WeightRatio:
    """Weights on noisy versus clean prompts of equal k (``weight_ratio_by_k``)."""

    ratio: float
    noisy_mean: float
    clean_standardised: float
    raw_ratio: float
    strata: tuple[tuple[int, int, int, float, float], ...]
    """(k, noisy prompts, clean prompts, mean noisy weight, mean clean weight) of every stratum holding both."""


def weight_ratio_by_k(weights: Tensor | np.ndarray, noisy: Tensor | np.ndarray, k: Tensor | np.ndarray) -> WeightRatio:
    """Mean weight on noisy prompts over the mean weight on clean prompts of the same k (pass prompts with RD > 0).

    Only strata holding both noisy and clean prompts count. With n_k noisy prompts of mean weight wn_k and clean
    prompts of mean weight wc_k in stratum k, the clean mean is standardised to the noisy prompts' k mix:
    ratio = (sum_k n_k wn_k / sum_k n_k) / (sum_k n_k wc_k / sum_k n_k). ``raw_ratio`` is the unmatched mean noisy
    weight over the mean clean weight, which also reflects that noisy and clean prompts differ in k.
    """
    w, is_noisy, strata = _numpy(weights), _numpy(noisy).astype(bool), _numpy(k).astype(int)
    rows = []
    for value in np.unique(strata):
        noisy_w, clean_w = w[(strata == value) & is_noisy], w[(strata == value) & ~is_noisy]
        if noisy_w.size and clean_w.size:
            rows.append((int(value), noisy_w.size, clean_w.size, float(noisy_w.mean()), float(clean_w.mean())))
    raw = float(w[is_noisy].mean() / w[~is_noisy].mean()) if is_noisy.any() and (~is_noisy).any() else math.nan
    if not rows:
        return WeightRatio(math.nan, math.nan, math.nan, raw, ())
    counts = np.array([row[1] for row in rows], dtype=float)
    noisy_mean = float(np.average([row[3] for row in rows], weights=counts))
    clean_standardised = float(np.average([row[4] for row in rows], weights=counts))
    return WeightRatio(noisy_mean / clean_standardised, noisy_mean, clean_standardised, raw, tuple(rows))


def _numpy(value: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().double().cpu().numpy()
    return np.asarray(value, dtype=float)
