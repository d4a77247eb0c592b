"""``last.ckpt`` that is the newest checkpoint of a fit, also when SIGTERM stops it.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when it also saves a
top-k checkpoint, i.e. when the monitored metric improves: the quickstart's settings left ``last.ckpt`` at step 8
of 20, and a resume lost every step since. And Lightning stops a fit on SIGTERM (what SLURM sends before a
preemption) by raising ``SystemExit`` without a code: the job exited 0, as if finished, with no checkpoint of the
steps since the last one.

:class:`LastCheckpoint` writes ``last.ckpt`` after every validation of a fit and at its end. It also takes SIGTERM
over from Lightning: Lightning's handler ran a broadcast inside the signal handler and each rank stopped on its
own flag, which under ``fsdp2`` (a collective in every forward pass) paired unrelated collectives and hung both
ranks (measured: a 2-rank fit still waiting 5 minutes after SIGTERM). Here the handler only notes the signal
(and passes it on to the other ranks Lightning's launcher started); at the end of every training step the ranks
agree (one all-reduce) whether any received it, and then all of them write ``last.ckpt``, say how to resume and
stop, skipping the validation and the export; the CLI turns the stop into exit status 143 (128 + SIGTERM).
``lit-gcpo`` adds it to every fit with checkpointing enabled and takes ``last.ckpt`` over from any
``ModelCheckpoint(save_last=...)`` (see :func:`take_over_save_last`).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""The exit status of a fit stopped by SIGTERM (as a shell reports a process killed by it): not a success."""


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation of a fit, at its end, and when SIGTERM stops it.

    Args:
        dirpath: where; None: the directory of the trainer's ``ModelCheckpoint`` (``<log dir>/checkpoints``
            unless it sets its own), or ``<log dir>/checkpoints`` without one.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._saved_step: int | None = None
        self.stopped_by_sigterm: str | None = None  # the checkpoint written at a SIGTERM stop
        self._sigterm = False  # this rank received SIGTERM

    def path(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / "last.ckpt"
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def save(self, trainer: Trainer) -> Path:
        """Write ``last.ckpt`` unless this step's is written already (a collective: every rank calls it)."""
        path = self.path(trainer)
        if self._saved_step != trainer.global_step or not path.exists():
            trainer.save_checkpoint(path)
            self._saved_step = trainer.global_step
        return path

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning registered its own handler (Trainer._run), which it restores at the end of the fit
        self._sigterm = False
        launcher = trainer.strategy.launcher

        def note(signum: int, frame: Any) -> None:
            if not self._sigterm and launcher is not None:
                launcher.kill(signum)  # Lightning's subprocess launcher: the other ranks are its children
            self._sigterm = True

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, note)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # every rank reaches this point once per step: the one place where they can agree to stop
        # (a SIGTERM before training started reached Lightning's handler, which set trainer.received_sigterm)
        received = self._sigterm or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(received, all=False):
            return
        path = self.save(trainer)
        self.stopped_by_sigterm = str(path)
        rank_zero_info(
            f"stopped by SIGTERM after step {trainer.global_step}: checkpoint {path}; resume with the same command "
            f"and --ckpt_path {path} (exit status {SIGTERM_EXIT_CODE}; no validation or export at the stop)"
        )
        raise SIGTERMException

    def state_dict(self) -> dict[str, Any]:
        return {}


def take_over_save_last(callbacks: list[Any], enabled: bool) -> list[Any]:
    """``callbacks`` with a :class:`LastCheckpoint` (unless given, or checkpointing disabled) and every
    ``ModelCheckpoint``'s ``save_last`` turned off: ``last.ckpt`` is then always the newest checkpoint."""
    if not enabled:
        return callbacks
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            callback.save_last = False
    if not any(isinstance(callback, LastCheckpoint) for callback in callbacks):
        callbacks = [*callbacks, LastCheckpoint()]
    return callbacks
