"""A progress bar that counts optimizer steps out of ``max_steps``.

Training streams prompts without end and stops at ``trainer.max_steps``, so Lightning's Rich bar, which
counts epochs, showed ``Epoch 0/-2`` (``max_epochs`` is -1 for a step-bounded run) and, after a resume, a
bar that restarted from 0. This one shows ``step k/max_steps`` and fills by the global step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, counting ``trainer.global_step`` out of ``trainer.max_steps`` (epochs when
    the run is bounded by ``max_epochs`` instead)."""

    def _bounded_by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._bounded_by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._bounded_by_steps():
            return super()._get_train_description(current_epoch)
        return f"step {self.trainer.global_step}/{self.trainer.max_steps}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._bounded_by_steps():  # a resumed run starts part-way
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._bounded_by_steps() and self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)
            self.refresh()
