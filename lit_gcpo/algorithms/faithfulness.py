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
- within strata of equal RD (for 0/1 rewards, the number of correct completions, which fixes the advantages):
  ranks centred in every stratum, then correlated; does the signal track V beyond the reward pattern?

each with a paired percentile-bootstrap 95% interval over prompts, and beside the control ``length`` (the mean
completion length: longer completions have larger gradients). A signal that does no better than length is no
evidence for geometry.
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
    """One signal's Spearman correlation with V: over all prompts, over those with RD > 0, and within strata of
    equal RD among those."""

    all_prompts: Interval
    spread_prompts: Interval
    within_rd: Interval


def faithfulness(
    signals: Mapping[str, Tensor | np.ndarray],
    variance: Tensor | np.ndarray,
    rd: Tensor | np.ndarray,
    lengths: Tensor | np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Faithfulness]:
    """Correlations of every signal (and of the ``length`` control) with the gradient variance.

    Args:
        signals: ``[P]`` per-prompt values by name (e.g. ``se``, ``cd``, ``bot``, ``rd``, ``u_c``).
        variance: ``[P]`` gradient variance V of each prompt (``gradient_variance``).
        rd: ``[P]`` reward dispersion, which selects the prompts with spread and defines the strata.
        lengths: ``[P]`` mean completion length of each prompt, the control reported as ``length``.
        resamples: bootstrap resamples.
        seed: seeds the bootstrap (signal k uses ``seed + k``).
    """
    v = _numpy(variance)
    dispersion = _numpy(rd)
    spread = dispersion > 0
    strata = np.round(dispersion[spread], 6)
    named = {**{name: _numpy(value) for name, value in signals.items()}, LENGTH: _numpy(lengths)}
    results = {}
    for offset, (name, x) in enumerate(named.items()):
        if x.shape != v.shape:
            raise ValueError(f"signal {name!r} has shape {x.shape}, variance has {v.shape}")
        results[name] = Faithfulness(
            bootstrap(spearman, (x, v), resamples, seed + offset),
            bootstrap(spearman, (x[spread], v[spread]), resamples, seed + offset),
            bootstrap(stratified_spearman, (x[spread], v[spread], strata), resamples, seed + offset),
        )
    return results


def _numpy(value: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().double().cpu().numpy()
    return np.asarray(value, dtype=float)
