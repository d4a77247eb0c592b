"""The evaluation-pass bookkeeping of ``RolloutDataModule``: which test dataloader is which pass, how each samples
and seeds, and which items the evaluation left out.

``lit-gcpo test`` builds one dataloader per test source and evaluation pass (a ``BenchmarkSource`` may ask for
several, greedy and sampled, with sampling of their own), in the order given. ``TestPasses`` remembers, by
dataloader index, each pass's name (``describe()``, and ``/<variant>`` for a pass), sampling, completions per
prompt, seed key and prompts, and the batches a resumed run already evaluated. ``skipped_items`` and
``too_long_items`` name what the sources or the context left out, for the evaluation report
(``lit_gcpo.data.contracts.EvaluationData``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lit_gcpo.data.sources import PromptSource
from lit_gcpo.data.streams import EvalPrompts
from lit_gcpo.engines.base import SamplingConfig


@dataclass(frozen=True)
class TestPass:
    """One test dataloader: its name, how it samples, and what seeds its prompts."""

    name: str
    sampling: SamplingConfig
    samples: int
    seed_key: str  # the benchmark's name and pass: sampling seeds do not follow its file's location
    prompts: list[str]


class TestPasses:
    """The test dataloaders' passes, from the last ``build`` on, and the batches to leave out of them."""

    def __init__(self) -> None:
        self.passes: list[TestPass] = []
        self.done: dict[str, set[tuple[int, ...]]] = {}  # by pass name: row positions of evaluated batches

    def build(
        self,
        splits: list[tuple[PromptSource, list[dict[str, Any]], list[str]]],
        default_sampling: SamplingConfig,
        samples: int,
        batch_size: int,
    ) -> list[EvalPrompts]:
        """One dataset per ``(source, rows, prompts)`` of ``splits`` and pass of it; rows are tagged with
        ``variant`` and ``position``, batches in ``done`` left out."""
        datasets, self.passes = [], []
        for source, rows, prompts in splits:
            for variant, sampling, count in source.eval_variants(default_sampling, samples):
                name = source.describe() + (f"/{variant}" if variant else "")
                tagged = [{**row, "variant": variant, "position": i} for i, row in enumerate(rows)]
                datasets.append(EvalPrompts(tagged, prompts, batch_size, self.done.get(name)))
                seed_key = f"{source.name or source.describe()}/{variant}"
                self.passes.append(TestPass(name, sampling, count, seed_key, prompts))
        return datasets

    def names(self) -> list[str]:
        return [test_pass.name for test_pass in self.passes]

    def prompts(self) -> dict[str, list[str]]:
        return {test_pass.name: list(test_pass.prompts) for test_pass in self.passes}


def skipped_items(sources: list[PromptSource | None]) -> dict[str, list[str]]:
    """Ids ``sources`` left out for an unreadable gold, by benchmark name (sources with ``name`` and ``skipped``:
    ``BenchmarkSource``)."""
    skipped: dict[str, list[str]] = {}
    for source in sources:
        if source is not None and source.skipped is not None and source.name is not None:
            skipped.setdefault(source.name, []).extend(source.skipped)
    return skipped


def too_long_items(
    stage: str, dropped_long_rows: dict[str, list[tuple[int, dict[str, Any]]]], test_sources: list[PromptSource]
) -> dict[str, list[str]]:
    """Ids of the items of ``stage`` left out for a prompt longer than the context (``long_prompts: skip``), by
    benchmark: a row's own ``benchmark`` field, else its test source's name (``test``) or ``<stage>0``.
    ``dropped_long_rows``: by split (``val``, ``test<i>``), ``(row index, row)``."""
    sources = test_sources if stage == "test" else []
    too_long: dict[str, list[str]] = {}
    for split, rows in dropped_long_rows.items():
        if stage == "test" and split.startswith("test") and int(split[4:]) < len(sources):
            default = sources[int(split[4:])].describe()  # the records' default benchmark: the loader's name
        elif stage != "test" and split == "val":
            default = f"{stage}0"
        else:
            continue
        for index, row in rows:
            name = str(row.get("benchmark") or default)
            too_long.setdefault(name, []).append(str(row.get("id", f"row {index}")))
    return too_long


class EvaluationAccess:
    """``RolloutDataModule``'s evaluation accessors (``lit_gcpo.data.contracts.EvaluationData``): its test passes,
    sources and sampling settings, read from the attributes of the same names that the DataModule sets."""

    def test_names(self) -> list[str]:
        """A name for each test dataloader: its source's ``describe()``, and ``/<variant>`` for a pass."""
        if self._test_passes.passes:
            return self._test_passes.names()
        return [source.describe() for source in (self.test_sources or [self.val_source]) if source is not None]

    def eval_settings(self, dataloader_idx: int) -> tuple[SamplingConfig, int]:
        """How evaluation dataloader ``dataloader_idx`` samples: ``(sampling, completions per prompt)``."""
        passes = self._test_passes.passes
        if self.trainer is not None and self.trainer.testing and dataloader_idx < len(passes):
            return passes[dataloader_idx].sampling, passes[dataloader_idx].samples
        return replace(self.sampling, temperature=self.val_temperature), self.val_samples

    def test_prompts(self) -> dict[str, list[str]]:
        """The prompts of each test dataloader, by its name (``test_names``)."""
        return self._test_passes.prompts()

    def skipped_items(self, stage: str) -> dict[str, list[str]]:
        """Ids the evaluation sources of ``stage`` (``test``: the test sources, else the validation source) left out
        for an unreadable gold, by benchmark name (sources with ``name`` and ``skipped``: ``BenchmarkSource``)."""
        sources = list(self.test_sources) if stage == "test" else []
        return skipped_items(sources or [self.val_source])  # testing without test sources tests on validation's

    def too_long_items(self, stage: str) -> dict[str, list[str]]:
        """Ids of the items of ``stage`` left out for a prompt longer than the context (``long_prompts: skip``),
        by benchmark: a row's own ``benchmark`` field, else its test source's name (``test``) or ``<stage>0``."""
        return too_long_items(stage, self.dropped_long_rows, list(self.test_sources))

    def skip_test_batches(self, done: dict[str, set[tuple[int, ...]]]) -> None:
        """Leave out of the test dataloaders the batches already evaluated (a resumed run), given as
        ``{test name: {row positions of a batch}}``; call before the test dataloaders are built."""
        self._test_passes.done = {name: set(batches) for name, batches in done.items()}

    def _eval_stream(self, dataloader_idx: int) -> str:
        """The name that seeds an evaluation dataloader's prompts: the test pass (benchmark and variant), so the
        same row of two benchmarks or passes draws differently; validation by its dataloader index."""
        passes = self._test_passes.passes
        if self.trainer.testing and dataloader_idx < len(passes):
            return f"test/{passes[dataloader_idx].seed_key}"
        return f"val/{dataloader_idx}"
