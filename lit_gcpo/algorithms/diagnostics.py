"""The training-time diagnostics window: per-group signals pooled over steps, correlated with RD.

One step has too few groups for a stable correlation, so the groups of every step are pooled until the next
diagnostics step, where each signal's Pearson and Spearman correlation with reward dispersion is computed over
the pool and the pool is emptied. Its content is plain tensors (``state_dict``), so a resumed run continues the
same window instead of starting a shorter one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

CORRELATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "pearson": pearson_corrcoef,
    "spearman": spearman_corrcoef,
}


def correlation_or_zero(correlation: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """``correlation(x, y)`` as float32; 0 where it is undefined (fewer than 3 points or a constant input), so
    that a run logs the same keys at every diagnostics step."""
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    if x.numel() < 3 or bool(x.std() == 0) or bool(y.std() == 0):
        return torch.zeros((), dtype=torch.float32)
    return correlation(x, y).float().nan_to_num(0.0)


class DiagnosticsWindow:
    """Per-group signals (``[B]`` tensors by name) of the steps since the last correlation.

    Args:
        reference: the signal every other one is correlated with.
    """

    def __init__(self, reference: str = "rd") -> None:
        self.reference = reference
        self._parts: dict[str, list[Tensor]] = {}

    def __len__(self) -> int:
        """Number of groups pooled."""
        parts = self._parts.get(self.reference, [])
        return int(sum(part.numel() for part in parts))

    def add(self, signals: Mapping[str, Tensor]) -> None:
        """Pool one step's signals (every one ``[B]``, the same names at every step)."""
        if self.reference not in signals:
            raise KeyError(f"DiagnosticsWindow needs the reference signal {self.reference!r}; got {sorted(signals)}")
        if self._parts and set(signals) != set(self._parts):
            raise ValueError(
                f"DiagnosticsWindow: signals {sorted(signals)} differ from the pooled {sorted(self._parts)}"
            )
        for name, value in signals.items():
            self._parts.setdefault(name, []).append(value.detach().float().cpu().flatten())

    def pooled(self) -> dict[str, Tensor]:
        """Every signal over the pooled groups, ``[groups]`` each."""
        return {name: torch.cat(parts) for name, parts in self._parts.items()}

    def correlations(self, prefix: str = "") -> dict[str, Tensor]:
        """``{prefix}{signal}_{pearson|spearman}`` of every signal with the reference over the pool, then empties
        the pool."""
        pooled = self.pooled()
        self._parts.clear()
        if not pooled:
            return {}
        reference = pooled.pop(self.reference)
        return {
            f"{prefix}{name}_{label}": correlation_or_zero(correlation, value, reference)
            for name, value in pooled.items()
            for label, correlation in CORRELATIONS.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "pooled": self.pooled()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "pooled" not in state:
            raise KeyError("DiagnosticsWindow state lacks 'pooled'")
        self.reference = str(state.get("reference", self.reference))
        self._parts = {name: [value.detach().float().cpu()] for name, value in state["pooled"].items()}
