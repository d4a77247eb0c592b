"""``model.surrogate``: a policy-loss surrogate other than PPO's clipped one, with its typed options.

Each class names an entry of ``lit_gcpo.algorithms.surrogates.SURROGATES`` (whose docstring has the papers, the
formulas and the project's choices) and validates its options on construction, so at parse time from a config:
``--model.surrogate CISPO --model.surrogate.max_ratio 4``. ``options()`` hands them to ``grpo_loss`` as plain
numbers. None (the default) is the clipped surrogate of ``model.eps_low``, ``eps_high``, ``dual_clip`` and
``ratio_level`` (PPO, GRPO, DAPO, GSPO), which do not act under another surrogate. LUSPO is not a surrogate of its
own: it is GSPO's clipped surrogate aggregated by ``seq_mean_token_sum`` (``model.ratio_level: sequence``,
``model.loss_aggregation: seq_mean_token_sum``).

``surrogate_problem`` refuses the module options a surrogate cannot honour, naming the option; TRL 1.16 refuses
VESPO with a sequence-level rollout correction and warns (only) about LUSPO with token ratios, VESPO with
sequence ratios and CISPO with sequence ratios: refused here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lit_gcpo.algorithms.surrogates import SURROGATES, validate_cispo, validate_sapo, validate_vespo
from lit_gcpo.algorithms.token_selection import ClipCov, KLCov
from lit_gcpo.moved import allow_unpickling


@dataclass(frozen=True)
class Surrogate:
    """A surrogate of the policy loss (``model.surrogate``): one of the subclasses below."""

    name: ClassVar[str] = ""

    def options(self) -> dict[str, float]:
        """The options as ``grpo_loss``'s ``surrogate_options``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True)
class CISPO(Surrogate):
    """``cispo`` (MiniMax-M1, arXiv 2506.13585): -sg(min(r, max_ratio)) A log pi per token; no token loses its gradient.

    Args:
        max_ratio: the cap of the importance weight, >= 1 (1 + eps_high^IS of the paper, ScaleRL's eps_max, TRL's
            ``epsilon_high`` under cispo; TRL recommends 5.0).
    """

    name: ClassVar[str] = "cispo"
    max_ratio: float = 5.0

    def __post_init__(self) -> None:
        validate_cispo(self.max_ratio)


@dataclass(frozen=True)
class SAPO(Surrogate):
    """``sapo`` (Gao et al. 2025, arXiv 2511.20347): -sigmoid(tau (r - 1)) 4 / tau A, a soft gate for the hard clip.

    Args:
        tau_pos: the gate's temperature for A > 0 (TRL's ``sapo_temperature_pos``; the paper's 1.0).
        tau_neg: for A <= 0 (TRL's ``sapo_temperature_neg``; the paper's 1.05: a larger tau, a faster decay).
    """

    name: ClassVar[str] = "sapo"
    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        validate_sapo(self.tau_pos, self.tau_neg)


@dataclass(frozen=True)
class VESPO(Surrogate):
    """``vespo`` (Shen et al. 2026, arXiv 2602.10693): -sg(phi(w)) A log pi, phi(w) = e^lambda w^k e^(-lambda w) of
    the sequence's importance weight w (the product of its token ratios).

    Args:
        k_pos: the power of w for A >= 0 (TRL's ``vespo_k_pos``; the authors' 2.0): how fast w < 1 is damped.
        lambda_pos: the decay for A >= 0 (3.0): how fast w > 1 is damped.
        k_neg: the power for A < 0 (3.0).
        lambda_neg: the decay for A < 0 (2.0).
    """

    name: ClassVar[str] = "vespo"
    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        validate_vespo(self.k_pos, self.lambda_pos, self.k_neg, self.lambda_neg)


for _surrogate in (CISPO, SAPO, VESPO):  # a module built in Python holds the object in its hyper-parameters
    allow_unpickling(_surrogate)

LUSPO_AGGREGATION = "seq_mean_token_sum"


def surrogate_problem(
    surrogate: Surrogate | None,
    ratio_level: str,
    dual_clip: float | None,
    rollout_correction: str | None,
    loss_aggregation: str,
    token_selection: Any = None,
) -> str | None:
    """Why these ``GRPOModule`` options are refused together, the message starting with the option at fault; None
    when they are fine."""
    if loss_aggregation == LUSPO_AGGREGATION and ratio_level != "sequence":
        return (
            f"loss_aggregation: {LUSPO_AGGREGATION} is LUSPO's: it weighs GSPO's sequence loss by the sequence's "
            "length and needs ratio_level sequence (with token ratios it is seq_mean_token_sum_norm times L_max)"
        )
    if surrogate is None:
        return None
    name = surrogate.name
    levels = SURROGATES.get(name).ratio_levels
    if ratio_level not in levels:
        own = " (VESPO forms its own sequence weight, the product of the token ratios)" if name == "vespo" else ""
        return f"ratio_level: surrogate {name} takes ratio_level {' or '.join(levels)}, got {ratio_level}{own}"
    if dual_clip is not None:
        return f"dual_clip: it caps the clipped surrogate's loss; with surrogate {name} leave it null"
    if name == "vespo" and rollout_correction is not None and rollout_correction.startswith("sequence"):
        return (
            f"rollout_correction: surrogate vespo folds the correction's token weights into its sequence weight; "
            f"{rollout_correction} has none (use token_truncate, token_mask or null; TRL refuses it too)"
        )
    if isinstance(token_selection, (ClipCov, KLCov)):
        return (
            f"token_selection: {token_selection.name} acts on the clipped surrogate (Clip-Cov leaves out what its clip "
            f"holds, KL-Cov unclips it); with surrogate {name} use HighEntropyTokens or null"
        )
    return None
