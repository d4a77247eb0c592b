"""``GRPOModule``'s options checked at construction (``lit-gcpo`` checks the typed ones at parse time already;
these also hold for a module built in Python), and the deprecated ``tis_cap`` resolved into its successors."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from lit_gcpo.algorithms.rollout_correction import rollout_correction_problem
from lit_gcpo.algorithms.surrogate_options import Surrogate, surrogate_problem

# option -> the condition its value must meet
CHECKS: dict[str, Callable[[Any], bool]] = {
    "beta": lambda v: v >= 0,
    "num_iterations": lambda v: v >= 1,
    "micro_batch_size": lambda v: v >= 0,
    "eps_low": lambda v: 0 <= v < 1,
    "eps_high": lambda v: v >= 0,
    "max_grad_norm": lambda v: v >= 0,
    "warmup_steps": lambda v: v >= 0,
    "min_lr_ratio": lambda v: 0 <= v <= 1,
    "off_policy_mask_threshold": lambda v: v is None or v > 0,
}


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first option of ``CHECKS`` whose value in ``options`` is invalid, then the
    options the surrogate cannot honour (``loss_options_problem``)."""
    for name, ok in CHECKS.items():
        if not ok(options[name]):
            raise ValueError(f"invalid value for {name}: {options[name]!r}")
    surrogate = options["surrogate"]
    if surrogate is not None and not isinstance(surrogate, Surrogate):
        raise TypeError(f"model.surrogate must be a Surrogate (CISPO, SAPO, VESPO) or None, got {type(surrogate)}")
    problem = loss_options_problem(options)
    if problem is not None:
        raise ValueError(problem)


def loss_options_problem(options: Mapping[str, Any]) -> str | None:
    """``surrogate_problem`` of the module options in ``options`` (the surrogate and token selection as objects)."""
    names = ("surrogate", "ratio_level", "dual_clip", "rollout_correction", "loss_aggregation", "token_selection")
    return surrogate_problem(*(options.get(name) for name in names))


def resolve_rollout_correction(
    tis_cap: float | None, mode: str | None, c_min: float | None, c_max: float | None
) -> tuple[str | None, float | None]:
    """``(rollout_correction, rollout_correction_max)`` after the deprecated ``tis_cap`` (``from_tis_cap``), checked:
    ``ValueError`` naming the option at fault (``rollout_correction_problem``)."""
    mode, c_max = from_tis_cap(tis_cap, mode, c_max)
    problem = rollout_correction_problem(mode, c_min, c_max)
    if problem is not None:
        raise ValueError(problem)
    return mode, c_max


def from_tis_cap(tis_cap: float | None, mode: str | None, c_max: float | None) -> tuple[str | None, float | None]:
    """``(rollout_correction, rollout_correction_max)`` given the deprecated ``tis_cap`` (None: not given), the C of
    ``token_truncate`` before the other modes existed, 0 turning the correction off."""
    if tis_cap is None:
        return mode, c_max
    warnings.warn(
        "model.tis_cap is deprecated: use model.rollout_correction_max (and rollout_correction null for tis_cap 0)",
        FutureWarning,
        stacklevel=4,  # the caller of GRPOModule(...)
    )
    if mode != "token_truncate" or c_max not in (2.0, tis_cap):
        raise ValueError(
            f"model.tis_cap {tis_cap} is the deprecated C_max of token_truncate; with rollout_correction {mode!r} and "
            f"rollout_correction_max {c_max} set, drop tis_cap"
        )
    return (None, c_max) if tis_cap == 0 else (mode, tis_cap)
