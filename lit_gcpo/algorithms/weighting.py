"""From per-prompt uncertainty to advantage weights (METHODS.md §5 and §5.1), as pure tensor functions.

One weight per prompt, ``w_b = f(alpha * u_b)``, multiplied into every advantage of its group. The pieces:

- the method's uncertainty (a ``Registry`` entry): ``grpo`` none (w = 1), ``seed_grpo`` SE_n, ``gcpo``
  U_c = U (1 - RD) with U = BoT or CD, and the control ``rd_only`` (U = 1, so u depends on 1 - RD alone:
  METHODS.md §5.1 asks every comparison to include it, geometry earns its place only by beating it);
- the scale (§5.1.2): ``batch_mean`` divides by the mean over the step's groups with reward spread (RD > 0),
  ``none`` keeps the raw value;
- the weight family f (``inverse`` 1/(1+x), ``linear``, ``exponential``, ``focal``);
- the normalisation (§5.1.4): rescale to mean 1 over the groups with RD > 0. Groups without reward spread have
  A = 0 whatever their weight, so they never enter a mean: including them would let all-correct and
  all-wrong prompts, which carry no update, change the size of the update of the others.

Data parallelism: every mean of the step is over all ranks. Functions take ``reduce``, a callable that sums a
tensor over the ranks (``trainer.strategy.reduce(t, reduce_op="sum")``; the identity on one process), and
only ever reduce sums and counts, so a step split over ranks gives the weights of the concatenated step.

Defaults per method (project's reading of the papers, METHODS.md §5.1.3): ``seed_grpo`` keeps the official
rule (inverse, alpha 0.0417, no scale, no normalisation); ``gcpo`` and ``rd_only`` use inverse, alpha 1,
``batch_mean`` and normalisation (w = 1 at no uncertainty, 1/2 at the step's average before normalising).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_gcpo.algorithms.registry import Registry

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the data-parallel ranks (the identity on one process)."""

GEOMETRIC_SIGNALS = ("bot", "cd")
SCALES = ("batch_mean", "none")


def no_reduce(value: Tensor) -> Tensor:
    """The ``reduce`` of a single process: the local sum is the global sum."""
    return value


WeightFamily = Callable[[Tensor, float], Tensor]
WEIGHT_FAMILIES: Registry[WeightFamily] = Registry("advantage-weight family")


@WEIGHT_FAMILIES.register("inverse")
def _inverse(x: Tensor, gamma: float) -> Tensor:
    return 1.0 / (1.0 + x)


@WEIGHT_FAMILIES.register("linear")
def _linear(x: Tensor, gamma: float) -> Tensor:
    return (1.0 - x).clamp(min=0.0)


@WEIGHT_FAMILIES.register("exponential")
def _exponential(x: Tensor, gamma: float) -> Tensor:
    return torch.exp(-x)


@WEIGHT_FAMILIES.register("focal")
def _focal(x: Tensor, gamma: float) -> Tensor:
    return (1.0 - x).clamp(min=0.0).pow(gamma)


@dataclass(frozen=True)
class WeightingDefaults:
    """A method's default weight family, alpha, scale and normalisation."""

    family: str
    alpha: float
    scale: str
    normalise: bool


WEIGHTING_DEFAULTS: dict[str, WeightingDefaults] = {
    "grpo": WeightingDefaults("inverse", 0.0, "none", False),
    "seed_grpo": WeightingDefaults("inverse", 0.0417, "none", False),
    "gcpo": WeightingDefaults("inverse", 1.0, "batch_mean", True),
    "rd_only": WeightingDefaults("inverse", 1.0, "batch_mean", True),
}

MethodUncertainty = Callable[[Mapping[str, Tensor], str], Tensor]
ADVANTAGE_WEIGHTINGS: Registry[MethodUncertainty] = Registry("advantage weighting method")


def _require(signals: Mapping[str, Tensor], name: str, method: str) -> Tensor:
    if name not in signals or signals[name] is None:
        raise ValueError(f"advantage weighting {method!r} needs signal {name!r}; got {sorted(signals)}")
    return signals[name]


def calibrated_uncertainty(uncertainty: Tensor, reward_dispersion: Tensor) -> Tensor:
    """``U_c = U * (1 - RD)`` (GCPO calibration, project's reading): damp only what rewards don't explain."""
    return uncertainty * (1.0 - reward_dispersion)


@ADVANTAGE_WEIGHTINGS.register("grpo")
def _grpo_uncertainty(signals: Mapping[str, Tensor], geometric: str) -> Tensor:
    return torch.zeros_like(_require(signals, "rd", "grpo"))


@ADVANTAGE_WEIGHTINGS.register("seed_grpo")
def _seed_grpo_uncertainty(signals: Mapping[str, Tensor], geometric: str) -> Tensor:
    return _require(signals, "se_n", "seed_grpo")


@ADVANTAGE_WEIGHTINGS.register("gcpo")
def _gcpo_uncertainty(signals: Mapping[str, Tensor], geometric: str) -> Tensor:
    if geometric not in GEOMETRIC_SIGNALS:
        raise ValueError(f"unknown geometric signal {geometric!r}; valid: {', '.join(GEOMETRIC_SIGNALS)}")
    return calibrated_uncertainty(_require(signals, geometric, "gcpo"), _require(signals, "rd", "gcpo"))


@ADVANTAGE_WEIGHTINGS.register("rd_only")
def _rd_only_uncertainty(signals: Mapping[str, Tensor], geometric: str) -> Tensor:
    return calibrated_uncertainty(torch.ones_like(_require(signals, "rd", "rd_only")), signals["rd"])


def spread_mean(values: Tensor, reward_dispersion: Tensor, reduce: Reduce = no_reduce) -> Tensor:
    """Mean of ``values [B]`` over the groups with RD > 0 of all ranks (0-dim; 0 when there is none)."""
    spread = reward_dispersion > 0  # [B]
    local = torch.stack([torch.where(spread, values, 0.0).sum(), spread.sum().to(values.dtype)])  # [2]
    total, count = reduce(local).unbind()
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))


def scale_free_uncertainty(
    uncertainty: Tensor, reward_dispersion: Tensor, reduce: Reduce = no_reduce
) -> tuple[Tensor, Tensor]:
    """``u_b = U_b / mean over the step's RD > 0 groups of U`` (METHODS.md §5.1.2) and that mean.

    u = 0 everywhere when the mean is 0 (no spread group, or no uncertainty on any of them).
    """
    mean = spread_mean(uncertainty, reward_dispersion, reduce)  # []
    scaled = torch.where(mean > 0, uncertainty / mean.clamp(min=1e-30), torch.zeros_like(uncertainty))
    return scaled, mean


def normalise_to_mean_one(weights: Tensor, reward_dispersion: Tensor, reduce: Reduce = no_reduce) -> Tensor:
    """Rescale ``weights [B]`` to mean 1 over the groups with RD > 0 of all ranks (METHODS.md §5.1.4).

    Every weight is divided by the same number, so zero-spread groups (A = 0) keep a harmless weight; when no
    group of the step has spread, or their weights are all 0, the weights are returned unchanged.
    """
    mean = spread_mean(weights, reward_dispersion, reduce)
    return torch.where(mean > 0, weights / mean.clamp(min=1e-30), weights)


def advantage_weights(
    method: str,
    signals: Mapping[str, Tensor],
    *,
    family: str | None = None,
    alpha: float | None = None,
    gamma: float = 2.0,
    geometric: str = "bot",
    scale: str | None = None,
    normalise: bool | None = None,
    reduce: Reduce = no_reduce,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One non-negative weight per group, ``[B]``, to multiply into every advantage of the group.

    Args:
        method: ``grpo`` (w = 1), ``seed_grpo`` (u from SE_n), ``gcpo`` (u from U (1 - RD), U =
            ``signals[geometric]``) or ``rd_only`` (u from 1 - RD, the control of METHODS.md §5.1).
        signals: ``[B]`` tensors by name as ``uncertainty_signals`` returns them; a method reads only the ones
            it needs (every method needs ``rd`` except ``seed_grpo`` without scale or normalisation).
        family: weight family name; None = the method's default (``WEIGHTING_DEFAULTS``).
        alpha: scale of the uncertainty, >= 0; None = the method's default.
        gamma: exponent of ``focal``.
        geometric: ``bot`` or ``cd``, the U of ``gcpo``.
        scale: ``batch_mean`` or ``none``; None = the method's default.
        normalise: rescale to mean 1 over the groups with RD > 0; None = the method's default.
        reduce: sums a tensor over data-parallel ranks (see the module docstring).

    Returns ``(weights [B] float32, details)``: ``details["u"]`` is the (scaled) uncertainty ``[B]`` fed to the
    family and ``details["u_scale"]`` the step mean it was divided by (1 without scaling).
    """
    uncertainty_of = ADVANTAGE_WEIGHTINGS.get(method)
    defaults = WEIGHTING_DEFAULTS[method]
    weight_family = WEIGHT_FAMILIES.get(family if family is not None else defaults.family)
    alpha = defaults.alpha if alpha is None else alpha
    scale = defaults.scale if scale is None else scale
    normalise = defaults.normalise if normalise is None else normalise
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    uncertainty = uncertainty_of(signals, geometric).double()  # [B]
    if method == "grpo":  # w = 1 whatever the family, scale or normalisation
        ones = torch.ones_like(uncertainty, dtype=torch.float32)
        return ones, {"u": torch.zeros_like(ones), "u_scale": ones.new_ones(())}
    u_scale = uncertainty.new_ones(())
    if scale == "batch_mean":
        uncertainty, u_scale = scale_free_uncertainty(uncertainty, _require(signals, "rd", method).double(), reduce)
    weights = weight_family(alpha * uncertainty, gamma)  # [B]
    if normalise:
        weights = normalise_to_mean_one(weights, _require(signals, "rd", method).double(), reduce)
    return weights.float(), {"u": uncertainty.float(), "u_scale": u_scale.float()}


def signal_statistics(name: str, value: Tensor) -> dict[str, Tensor]:
    """``{name}_mean/_min/_max/_std`` of a ``[B]`` signal as detached 0-dim float32 tensors (std over groups,
    population form; an empty signal gives zeros)."""
    value = value.detach().float()
    if value.numel() == 0:
        zero = value.new_zeros(())
        return {f"{name}_{statistic}": zero for statistic in ("mean", "min", "max", "std")}
    return {
        f"{name}_mean": value.mean(),
        f"{name}_min": value.min(),
        f"{name}_max": value.max(),
        f"{name}_std": value.std(unbiased=False),
    }
