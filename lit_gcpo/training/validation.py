"""What the module keeps of its evaluation passes: the starting policy's baseline and the validation history
(``ValidationRecord``, which the module's evaluation hooks call).

Lightning discards what is logged during the sanity check; with ``num_sanity_val_steps: -1`` that check is a
full validation of the starting policy, so ``StartingPolicyBaseline`` accumulates it (reduced over data-parallel
ranks by torchmetrics) to be written to the loggers as the step-0 baseline. ``validation_summary`` is the line
printed at the end of fit from the ``(step, val/accuracy)`` history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info

from lit_gcpo.data.batch import RolloutBatch

BASELINE_METRICS = ("val/accuracy", "val/reward_mean")


class StartingPolicyBaseline(torch.nn.Module):
    """Running means of the sanity check's rewards and accuracies (a submodule: it follows the module's device)."""

    def __init__(self) -> None:
        super().__init__()
        self.means = torch.nn.ModuleDict({name: torchmetrics.MeanMetric() for name in BASELINE_METRICS})

    def update(self, rewards: torch.Tensor, accuracy: torch.Tensor | None) -> None:
        """``rewards`` ``[n]`` finite (NaN already replaced); ``accuracy`` ``[n]`` or None (no graded answers)."""
        self.means["val/reward_mean"].update(rewards)
        if accuracy is not None:
            self.means["val/accuracy"].update(accuracy)

    def compute_and_reset(self) -> dict[str, float]:
        """The means over every rank of what was updated since the last call (none: left out)."""
        values = {}
        for name, metric in self.means.items():
            if metric.update_count:
                values[name] = float(metric.compute())  # reduced over data-parallel ranks
            metric.reset()
        return values

    def write(self, loggers: Iterable[Any], step: int) -> dict[str, float]:
        """Write the means to every logger at ``step`` (the step-0 baseline), say them on rank 0, and return them."""
        values = self.compute_and_reset()
        for logger in loggers:
            logger.log_metrics(values, step=step)
        if values:
            rank_zero_info("starting policy: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return values


def log_eval_batch(
    log: Callable[..., None], batch: RolloutBatch, stage: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log an evaluation batch's reward mean (NaN counted 0), accuracy and completion length under ``stage/`` with
    ``log`` (``LightningModule.log``, synced over ranks); return its rewards ``[n]`` and accuracy ``[n]`` or None."""
    accuracy = batch.correct
    finite = batch.rewards.nan_to_num(0.0)
    n = batch.num_completions
    log(f"{stage}/reward_mean", finite.mean(), batch_size=n, sync_dist=True, prog_bar=False)
    if accuracy is not None:
        log(f"{stage}/accuracy", accuracy.mean(), batch_size=n, sync_dist=True, prog_bar=True)
    log(f"{stage}/completion_length", batch.completion_mask.sum(-1).mean(), batch_size=n, sync_dist=True)
    return finite, accuracy


def validation_summary(history: list[tuple[int, float]]) -> str:
    """``validation accuracy first (step s) -> best b (step s), last l`` from ``(step, accuracy)`` pairs; empty
    history: the empty string."""
    if not history:
        return ""
    (first_step, first), (best_step, best) = history[0], max(history, key=lambda item: item[1])
    return (
        f"validation accuracy {first:.3f} (step {first_step}) -> best {best:.3f} (step {best_step}), "
        f"last {history[-1][1]:.3f}"
    )


class ValidationRecord(torch.nn.Module):
    """The module's evaluation batches logged, the starting policy's baseline and the history of ``val/accuracy``
    (``history``: ``(step, accuracy)`` pairs, kept across resume in the checkpoint's ``lit_gcpo`` entry:
    ``checkpoint_state`` / ``load_checkpoint_state``). A submodule, so that the baseline's metrics follow the
    module's device."""

    def __init__(self) -> None:
        super().__init__()
        self.baseline = StartingPolicyBaseline()
        self.history: list[tuple[int, float]] = []

    def log_batch(self, log: Callable[..., None], batch: RolloutBatch, stage: str, sanity_checking: bool) -> None:
        """Log an evaluation batch (``log_eval_batch``); the sanity check's validation batches make the baseline."""
        finite, accuracy = log_eval_batch(log, batch, stage)
        if stage == "val" and sanity_checking:
            self.baseline.update(finite, accuracy)

    def end_validation(self, trainer: Any, step: int) -> None:
        """After a validation: its ``val/accuracy`` joins the history; after the sanity check, the baseline is
        written to ``trainer``'s loggers at ``step`` (and joins the history)."""
        if not trainer.sanity_checking:
            accuracy = trainer.callback_metrics.get("val/accuracy")
            if accuracy is not None:
                self.history.append((step, float(accuracy)))
            return
        values = self.baseline.write(trainer.loggers, step)
        if "val/accuracy" in values:
            self.history.append((step, values["val/accuracy"]))

    def summary(self) -> str:
        """``validation_summary`` of the history."""
        return validation_summary(self.history)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"validation_history": [list(item) for item in self.history]}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), float(value)) for step, value in state.get("validation_history", [])]
