"""``BenchmarkReport``: grade evaluation rollouts per benchmark, and report accuracy and calibration.

A thin Lightning adapter: each test (or validation) batch, a ``RolloutBatch`` of k completions per
prompt from either engine, becomes one record per prompt (``lit_gcpo.evaluation.results.
rollout_records``: grades by ``lit_gcpo.evaluation.grading``, uncertainty signals by
``lit_gcpo.evaluation.calibration``). At the end of the epoch the records of all ranks are gathered,
``lit_gcpo.evaluation.results`` turns them into per-benchmark metrics (torchmetrics), which are logged as
``<stage>/<benchmark>/<metric>``, printed as a table (rank 0) and written with every record as JSON and
CSV.

Gathering the records first (instead of syncing each torchmetrics object) makes every rank compute the
same numbers even when a rank saw no batch of some benchmark, and the files hold every item once.

``lit-gcpo test`` also writes each batch's records as it comes (``lit_gcpo.evaluation.progress``); a run
restarted with the same config and ``output_dir`` skips the batches found there (the DataModule leaves
them out of its test dataloaders) and reports from the saved and the new records together, so its
report is the one an uninterrupted run gives. The DataModule is read through ``lit_gcpo.data.contracts.EvaluationData``
(checked in ``setup``). The paper-style table (``lit_gcpo.evaluation.paper``: one
row for this model, one column per benchmark and pass, averages) is printed and written next to it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.data.contracts import EvaluationData, check_implements
from lit_gcpo.evaluation.paper import format_paper_table
from lit_gcpo.evaluation.progress import EvaluationProgress
from lit_gcpo.evaluation.results import (
    Record,
    format_table,
    missing_verdicts,
    rollout_records,
    summarise,
    write_results,
)
from lit_gcpo.rewards.answers import FALLBACKS

log = logging.getLogger(__name__)


class BenchmarkReport(pl.Callback):
    """Per-benchmark accuracy (greedy, avg@k, pass@k, maj@k; QA EM/F1) and uncertainty AUROCs.

    Rows are read from ``batch.rows``: ``kind`` (``math``/``qa``, default ``math``), ``gold`` (else
    ``answer``), ``benchmark`` (default: the dataloader's name), ``id`` and ``index`` (default: arrival
    order). ``BenchmarkSource`` rows carry all of them.

    Args:
        output_dir: where ``<stem>_benchmarks.json``, ``<stem>_items.csv``, ``<stem>_summary.csv`` and
            ``<stem>_table.md`` are written (stem ``test``, or ``val-step<N>``); None = the trainer's log
            dir (else its ``default_root_dir``).
        pass_ks: the k of pass@k; None = 1, 2, 4, ... below the completions per prompt, and that count.
        geometric: ``bot`` or ``cd``, the geometric signal U of the calibrated ``u_c = U (1 - RD)``.
        reward_range: ``(min, max)`` possible reward, the scale of reward dispersion RD.
        validation: also report after every validation epoch (not only ``lit-gcpo test``).
        resume: write each test batch's records to ``test_progress.rank<r>.jsonl`` in the output
            directory and skip the batches already there. Needs a fixed ``output_dir``: the default
            directory is a new ``version_N`` for every run, so nothing is found to resume from.
        label: the model's row label in the paper table; None = the module's ``model`` (plus the
            checkpoint's file name when testing one).
        averages: named averages of the paper table, ``{name: [benchmark, ...]}``; None = one
            ``average`` over every benchmark.
        context_length: the model's context in tokens, for the count of prompts longer than it; None =
            the policy's ``config.max_position_embeddings`` (when it has one).
        answer_fallback: how a math completion without a ``\\boxed{}`` is read: ``none`` (the default: no
            answer, graded wrong), ``last_number`` (the last number in the text: the Qwen2.5-Math
            evaluation's ``use_last_number``) or ``math_verify`` (Math-Verify's LaTeX extraction of the
            whole completion). Part of the settings a resumed evaluation must share.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        pass_ks: list[int] | None = None,
        geometric: str = "bot",
        reward_range: tuple[float, float] = (0.0, 1.0),
        validation: bool = False,
        resume: bool = True,
        label: str | None = None,
        averages: dict[str, list[str]] | None = None,
        context_length: int | None = None,
        answer_fallback: Literal["none", "last_number", "math_verify"] = "none",
    ) -> None:
        if pass_ks is not None and any(k < 1 for k in pass_ks):
            raise ValueError(f"BenchmarkReport pass_ks must be >= 1, got {pass_ks}")
        if geometric not in ("bot", "cd"):
            raise ValueError(f"BenchmarkReport geometric={geometric!r}; valid: bot, cd")
        self.output_dir = output_dir
        self.pass_ks = pass_ks
        self.geometric = geometric
        self.reward_range = (float(reward_range[0]), float(reward_range[1]))
        self.validation = validation
        if answer_fallback not in FALLBACKS:
            raise ValueError(f"BenchmarkReport answer_fallback={answer_fallback!r}; valid: {', '.join(FALLBACKS)}")
        self.answer_fallback = answer_fallback
        self.resume, self.label, self.averages, self.context_length = resume, label, averages, context_length
        self.progress: EvaluationProgress | None = None
        self.records: list[Record] = []
        self.summary: dict[str, dict[str, float]] = {}
        self.paths: dict[str, Path] = {}

    # ------------------------------------------------------------------------------------------ hooks
    def rollout_fields(self, stage: str) -> set[str]:
        """The optional batch fields the report reads (``lit_gcpo.data.batch.requested_fields``): the policy's
        embeddings and sequence log-probs of evaluation batches, for the uncertainty signals of each prompt."""
        wanted = stage == "test" or (stage == "val" and self.validation)
        return {"embeddings", "seq_logprobs"} if wanted else set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the test dataloaders exist: check the DataModule's interface, and find the batches an interrupted
        run finished."""
        self.progress = None
        data = _evaluation_data(trainer)
        if data is not None:
            check_implements(data, EvaluationData, "the DataModule of a BenchmarkReport,")
        if stage != "test" or not self.resume:
            return
        path = self._directory(trainer) / f"test_progress.rank{trainer.global_rank}.jsonl"
        self.progress = EvaluationProgress(path)
        self.progress.load()
        if trainer.world_size > 1:  # every rank must run the same batches (see lit_gcpo.evaluation.progress)
            common = common_counts(_gather_objects(trainer, self.progress.counts()))
            dropped = self.progress.keep_first(common)
            if dropped:
                log.warning(
                    "%s: %d evaluated batches are evaluated again: another rank had not finished them", path, dropped
                )
        if self.progress.batches:
            if data is None:
                raise RuntimeError(f"{path}: resuming needs a DataModule (an EvaluationData: RolloutDataModule)")
            data.skip_test_batches(self.progress.done())

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress is not None:  # the dataloaders exist now: the passes' settings are known
            self.progress.check(self._settings(trainer, pl_module), self._prompts(trainer))

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records = self.progress.records() if self.progress is not None else []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        name = self._loader_name(trainer, "test", dataloader_idx)
        records = self.grade_batch(batch, name)
        self.records += records
        if self.progress is not None:
            positions = [int(row.get("position", -1)) for row in batch.rows]
            self.progress.append(name, positions, self._settings(trainer, pl_module)[name], records)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.validation:
            self.records += self.grade_batch(batch, self._loader_name(trainer, "val", dataloader_idx))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test", "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validation:
            self._report(trainer, pl_module, "val", f"val-step{trainer.global_step}")

    # ---------------------------------------------------------------------------------------- grading
    def grade_batch(self, batch: RolloutBatch, default_benchmark: str = "benchmark") -> list[Record]:
        """One record per prompt of ``batch`` (``lit_gcpo.evaluation.results.rollout_records``)."""
        return rollout_records(
            batch,
            default_benchmark=default_benchmark,
            geometric=self.geometric,
            reward_range=self.reward_range,
            first_index=len(self.records),
            fallback=self.answer_fallback,
        )

    # -------------------------------------------------------------------------------------- reporting
    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, stem: str) -> None:
        records = _gather(trainer, self.records)
        order = {}
        for record in records:  # benchmarks in the order their first batch arrived on rank 0 ...
            order.setdefault(record["benchmark"], len(order))
        records.sort(key=lambda r: (order[r["benchmark"]], r["index"]))  # ... items in benchmark order
        skipped, too_long = self._left_out(trainer, stage)
        context = self._context_length(pl_module)
        self.summary = summarise(records, skipped, self.pass_ks, context, too_long)
        for benchmark, values in self.summary.items():
            for metric, value in values.items():
                pl_module.log(f"{stage}/{benchmark}/{metric}", float(value), sync_dist=True)  # equal on every rank
        directory = self._directory(trainer)  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero:
            table = format_table(self.summary)
            label = self._label(trainer, pl_module)
            paper = format_paper_table({label: self.summary}, self.averages)
            print(f"\n{stage} benchmarks ({len(records)} items)\n{table}\n\n{paper}\n")
            extra = {"label": label, "averages": self.averages, "context_length": context}
            extra["skipped_over_context"] = too_long  # the ids of "skipped" left out for their prompt's length
            names = {**skipped, **too_long}
            every_skipped = {name: [*skipped.get(name, []), *too_long.get(name, [])] for name in names}
            self.paths = write_results(directory, stem, self.summary, records, every_skipped, extra, paper)
            for benchmark, ids in skipped.items():
                if ids:
                    log.warning("%s: %d items left out for an unreadable gold: %s", benchmark, len(ids), ids[:10])
            for benchmark, problems in missing_verdicts(records).items():
                log.warning(
                    "%s: no Math-Verify verdict or result in the grading of %d completions (its comparison with "
                    "the gold: graded wrong; an extraction: no answer; the majority vote's and the answer "
                    "clustering's: not equivalent): %s",
                    benchmark,
                    len(problems),
                    "; ".join(problems[:10]),
                )
            for benchmark, ids in too_long.items():
                if ids:
                    log.warning(
                        "%s: %d items left out for a prompt longer than the context (data.long_prompts: skip): %s",
                        benchmark,
                        len(ids),
                        ids[:10],
                    )
            for name, values in self.summary.items():
                if values.get("over_context", 0) > 0:
                    log.warning(
                        "%s: %d of %d prompts are longer than the model's context (%s tokens) or than what it leaves "
                        "for the completion; cut, their completions are unreliable, skipped, they are not graded "
                        "(cut the context with max_context_tokens, or lower max_new_tokens)",
                        name,
                        int(values["over_context"]),
                        int(values["items"] + values.get("skipped", 0)),
                        context,
                    )
            log.info("benchmark results written to %s", self.paths["json"])
        self.records = records

    def _settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """What decides each test pass's batches and completions (compared when resuming)."""
        data = _evaluation_data(trainer)
        common = {
            "batch_size": None if data is None else data.val_batch_size,
            "world_size": trainer.world_size,
            "seed": None if data is None else data.seed,
            "label": self._label(trainer, pl_module),
            "answer_fallback": self.answer_fallback,
        }
        settings = {}
        for index, name in enumerate([] if data is None else data.test_names()):
            sampling, samples = data.eval_settings(index)
            described = asdict(sampling)
            described.pop("seed", None)  # set per batch by the DataModule from its seed (in "seed")
            settings[name] = {**common, "sampling": described, "samples": samples}
        return settings

    @staticmethod
    def _prompts(trainer: pl.Trainer) -> dict[str, list[str]]:
        """The prompts of each test dataloader, by its name."""
        data = _evaluation_data(trainer)
        return {} if data is None else data.test_prompts()

    def _label(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.label is not None:
            return self.label
        hparams = getattr(pl_module, "hparams", None) or {}
        label = str(hparams.get("model", "model"))
        ckpt = getattr(trainer, "ckpt_path", None)
        return f"{label} @ {Path(ckpt).name}" if ckpt else label

    def _context_length(self, pl_module: pl.LightningModule) -> int | None:
        if self.context_length is not None:
            return self.context_length
        config = getattr(getattr(pl_module, "policy", None), "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    def _directory(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def _loader_name(trainer: pl.Trainer, stage: str, dataloader_idx: int) -> str:
        data = _evaluation_data(trainer)
        if stage == "test" and data is not None:
            names = data.test_names()
            if dataloader_idx < len(names):
                return names[dataloader_idx]
        return f"{stage}{dataloader_idx}"

    @staticmethod
    def _left_out(trainer: pl.Trainer, stage: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Ids of this stage's items left out, by benchmark: for an unreadable gold, and for a prompt longer than
        the context (``long_prompts: skip``)."""
        data = _evaluation_data(trainer)
        return ({}, {}) if data is None else (data.skipped_items(stage), data.too_long_items(stage))


def _evaluation_data(trainer: pl.Trainer) -> EvaluationData | None:
    """The trainer's DataModule (checked to be an ``EvaluationData`` in ``setup``), or None: a report of batches
    without one (the names, settings and prompts are then unknown)."""
    return trainer.datamodule


def _gather_objects(trainer: pl.Trainer, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` on one process)."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, value)
    return everyone


def _gather(trainer: pl.Trainer, records: list[Record]) -> list[Record]:
    """Every rank's records on every rank (a copy of the local list on one process)."""
    return [record for part in _gather_objects(trainer, records) for record in (part or [])]


def common_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    """For each test name, the batches done on every rank: the smallest count over the ranks (0 where a rank
    has none)."""
    names = {name for counts in per_rank for name in counts}
    return {name: min(counts.get(name, 0) for counts in per_rank) for name in names}
