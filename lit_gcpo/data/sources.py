"""Where prompts come from: a Hugging Face dataset, local JSONL/Parquet files, or the built-in task.

Every source returns rows as plain dicts. ``fields`` renames source columns to the names the prompt
template and the reward functions read (e.g. ``{"problem": "prompt"}``).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

from lit_gcpo.engines.base import SamplingConfig


class PromptSource(abc.ABC):
    """A list of rows (dicts) to draw prompts from.

    Args:
        fields: renames columns, ``{source_name: name_used_here}``.
        limit: keep only the first ``limit`` rows (0 = all).

    What a source may add for the DataModule (the defaults here change nothing): ``template`` and
    ``required_fields`` of its own (None: the DataModule's); a benchmark's ``name`` and the ids of the rows it left
    out, ``skipped`` (None: it reports none); ``bind_tokenizer`` (sources that budget their text in tokens); and
    ``eval_variants`` (evaluation passes with sampling of their own).
    """

    template: str | None = None
    required_fields: list[str] | None = None
    name: str | None = None
    skipped: list[str] | None = None

    def __init__(self, fields: dict[str, str] | None = None, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.fields = dict(fields or {})
        self.limit = limit

    @abc.abstractmethod
    def _read(self) -> list[dict[str, Any]]:
        """The raw rows."""

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Receive the policy's tokenizer before ``load`` (unused by default)."""
        del tokenizer

    def eval_variants(self, sampling: SamplingConfig, samples: int) -> list[tuple[str, SamplingConfig, int]]:
        """The evaluation passes over this source, ``(variant, sampling, samples)``, given the DataModule's
        ``sampling`` and ``samples`` per prompt: by default one pass with those."""
        return [("", sampling, samples)]

    def load(self) -> list[dict[str, Any]]:
        rows = self._read()
        if self.limit:
            rows = rows[: self.limit]
        if self.fields:
            rows = [{self.fields.get(key, key): value for key, value in row.items()} for row in rows]
        return rows

    def describe(self) -> str:
        return type(self).__name__


class HubDataset(PromptSource):
    """A dataset from the Hugging Face hub (or a local dataset directory) through ``datasets``.

    Args:
        path: the dataset name, e.g. ``"DigitalLearningGmbH/MATH-lighteval"``.
        split: which split to read.
        name: the dataset configuration, if it has several.
        revision: a git revision of the dataset repository.
        fields: renames columns, ``{source_name: name_used_here}``.
        limit: keep only the first ``limit`` rows (0 = all).
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        name: str | None = None,
        revision: str | None = None,
        fields: dict[str, str] | None = None,
        limit: int = 0,
    ) -> None:
        super().__init__(fields, limit)
        self.path, self.split, self.name, self.revision = path, split, name, revision

    def _read(self) -> list[dict[str, Any]]:
        import datasets

        try:
            dataset = datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision)
        except StopIteration as error:  # an empty data file gives a bare StopIteration
            raise ValueError(f"path: {self.describe()} has an empty data file") from error
        return dataset.to_list()

    def describe(self) -> str:
        return f"{self.path}[{self.split}]"


class LocalFiles(PromptSource):
    """Local JSONL/JSON or Parquet files. JSON lines are read with ``json`` (each line checked, its row as written;
    ``datasets`` costs ~95 MiB of memory for no gain there), JSON documents and Parquet with ``datasets``.

    Args:
        files: one path or a list of paths (all of one format, chosen by the first file's suffix).
        fields: renames columns, ``{source_name: name_used_here}``.
        limit: keep only the first ``limit`` rows (0 = all).
    """

    _BUILDERS: ClassVar[dict[str, str]] = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

    def __init__(self, files: str | list[str], fields: dict[str, str] | None = None, limit: int = 0) -> None:
        super().__init__(fields, limit)
        self.files = [files] if isinstance(files, str) else list(files)
        if not self.files:
            raise ValueError("files must name at least one file")
        suffix = Path(self.files[0]).suffix.lower()
        if suffix not in self._BUILDERS:
            raise ValueError(f"files: unsupported format {suffix!r} of {self.files[0]}; use .jsonl, .json or .parquet")
        self.builder = self._BUILDERS[suffix]

    def _read(self) -> list[dict[str, Any]]:
        missing = [f for f in self.files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"files: no such file {missing[0]}")
        if self.builder == "json":
            rows = [row for file in self.files for row in check_json_lines(file)]
            if all(file.lower().endswith(".jsonl") for file in self.files):
                return rows
        import datasets

        try:
            dataset = datasets.load_dataset(self.builder, data_files=self.files, split="train")
        except (StopIteration, ValueError, OSError) as error:  # e.g. a bare StopIteration for an empty file
            raise ValueError(f"files: cannot read {self.describe()} ({type(error).__name__}: {error})") from error
        return dataset.to_list()

    def describe(self) -> str:
        return ", ".join(self.files)


def check_json_lines(file: str) -> list[dict[str, Any]]:
    """The rows of a JSONL ``file`` (none for a ``.json`` file, whose content, one document or lines, is left to
    ``datasets``). Raises ``ValueError`` naming ``file`` and the line when the file is empty or a line is not a
    JSON object (``datasets`` says neither: a bare ``StopIteration``, or a character position without the file)."""
    with open(file, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"files: {file} is empty (no rows)")
    if not file.lower().endswith(".jsonl"):
        return []
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"files: {file}, line {number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"files: {file}, line {number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
