"""``lit-gcpo predict``: completions of a prompt file by a trained policy, one JSON line each.

The DataModule samples ``data.val_samples`` completions per prompt of ``data.predict`` at
``data.val_temperature`` (as for evaluation) and scores them with ``data.rewards``; a row without a gold
answer gets no score (``null``), not 0. ``PredictionWriter`` writes one line per completion::

    {"prompt_index": 0, "sample": 0, "prompt": "...", "completion": "...", "answer": "12",
     "truncated": false, "reward": 1.0, "rewards": {"math_accuracy": 1.0}, "correct": true, "row": {...}}

(``correct``: the ``accuracy_reward`` above 0.5, null for a row without gold; absent without an
``accuracy_reward``). The CLI adds the writer to ``predict`` runs that configure none, writing
``predictions.jsonl`` in the run's log directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_gcpo.data.batch import RolloutBatch


def _score(value: float) -> float | None:
    return None if math.isnan(value) else value


def rollout_records(batch: RolloutBatch, correct: list[bool | None] | None = None, first_prompt: int = 0) -> list[dict]:
    """One JSON-ready dict per completion of ``batch`` (group-major), numbering prompts from ``first_prompt``."""
    group_ids = batch.group_ids.tolist()  # [N]
    totals = batch.rewards.tolist()  # [N]
    components = {name: scores.tolist() for name, scores in batch.reward_components.items()}
    records, samples = [], [0] * len(batch.prompts)
    for n, group in enumerate(group_ids):
        record: dict[str, Any] = {
            "prompt_index": first_prompt + group,
            "sample": samples[group],
            "prompt": batch.prompts[group],
            "completion": batch.completions[n],
            "answer": batch.answers[n] if batch.answers else None,
            "truncated": bool(batch.truncated[n]) if batch.truncated is not None else None,
            "reward": _score(totals[n]),
            "rewards": {name: _score(values[n]) for name, values in components.items()},
        }
        if correct is not None:
            record["correct"] = correct[n]
        record["row"] = batch.rows[group]
        samples[group] += 1
        records.append(record)
    return records


class PredictionWriter(BasePredictionWriter):
    """Writes the completions of ``lit-gcpo predict`` as JSON lines.

    Args:
        output: the JSONL file to write; None: ``predictions.jsonl`` in the run's log directory. An existing
            file is never overwritten (the run stops before generating, naming it). With several ranks each
            writes ``<stem>.rank<r>.jsonl``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.path: Path | None = None
        self._handle: TextIO | None = None
        self._prompts = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = (
            Path(self.output)
            if self.output
            else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        )
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        if path.exists():
            raise FileExistsError(f"PredictionWriter.output: {path} exists; choose another file")
        path.parent.mkdir(parents=True, exist_ok=True)
        # kept open across batches (closed in on_predict_end) so that each batch is on disk when written
        self.path, self._handle, self._prompts = path, open(path, "x", encoding="utf-8"), 0  # noqa: SIM115

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._handle is not None, "on_predict_start was not called"
        name = getattr(trainer.datamodule, "accuracy_reward", None)
        correct = None
        if name in batch.reward_components:  # correct = the accuracy reward above 0.5; None without a gold
            scores = batch.reward_components[name].tolist()
            correct = [None if math.isnan(value) else value > 0.5 for value in scores]
        for record in rollout_records(batch, correct, self._prompts):
            self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._handle.flush()
        self._prompts += len(batch.prompts)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            print(f"predictions: {self._prompts} prompts written to {self.path}")
