"""Where prompts come from: a Hugging Face dataset, local JSONL/Parquet files, or the built-in task.

Every source returns rows as plain dicts. ``fields`` renames source columns to the names the prompt
template and the reward functions read (e.g. ``{"problem": "prompt"}``). ``PromptSource.where`` names the
place of a row (``file.jsonl, line 7`` for JSON lines), and ``check_field_types`` refuses a row whose text
or gold field has a type no template or reward can read, naming that place and the field.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Sequence
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

    def where(self, index: int) -> str:
        """Where row ``index`` of ``load()`` comes from, for error messages."""
        return f"{self.describe()}, row {index}"

    def column(self, name: str) -> str:
        """The source's own name of field ``name`` (before ``fields`` renamed it)."""
        return next((source for source, renamed in self.fields.items() if renamed == name), name)


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
        self._origins: list[str] = []  # "file, line N" of each JSON-lines row read
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
            numbered = [(file, line, row) for file in self.files for line, row in _json_lines(file)]
            if all(file.lower().endswith(".jsonl") for file in self.files):
                self._origins = [f"{file}, line {line}" for file, line, _ in numbered]
                return [row for _, _, row in numbered]
        import datasets

        try:
            dataset = datasets.load_dataset(self.builder, data_files=self.files, split="train")
        except (StopIteration, ValueError, OSError) as error:  # e.g. a bare StopIteration for an empty file
            raise ValueError(f"files: cannot read {self.describe()} ({type(error).__name__}: {error})") from error
        return dataset.to_list()

    def describe(self) -> str:
        return ", ".join(self.files)

    def where(self, index: int) -> str:
        return self._origins[index] if index < len(self._origins) else f"{self.describe()}, row {index}"


def check_json_lines(file: str) -> list[dict[str, Any]]:
    """The rows of a JSONL ``file`` (none for a ``.json`` file, whose content, one document or lines, is left to
    ``datasets``). Raises ``ValueError`` naming ``file`` and the line when the file is empty, is not UTF-8 text
    (a binary or compressed file: Python says only ``UnicodeDecodeError ... position 5193``) or a line is not a
    JSON object (``datasets`` says neither: a bare ``StopIteration``, or a character position without the file)."""
    return [row for _, row in _json_lines(file)]


def _json_lines(file: str) -> list[tuple[int, dict[str, Any]]]:
    """``check_json_lines`` with each row's line number."""
    data = Path(file).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise ValueError(
            f"files: {file}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
            "a binary or compressed file? Rows must be UTF-8 JSON"
        ) from None
    if not text.strip():
        raise ValueError(f"files: {file} is empty (no rows)")
    if not file.lower().endswith(".jsonl"):
        return []
    rows = []
    # split on "\n" only: str.splitlines also splits on U+2028 and other separators JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
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
        rows.append((number, row))
    return rows


def _gold_like(value: Any) -> bool:
    """A value some reward reads as a gold answer: text, a finite number, a list of them (OlympiadBench, QA
    synonyms) or SQuAD's ``{"text": [...]}``."""
    if isinstance(value, str):
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_gold_like(v) for v in value)
    if isinstance(value, dict):
        return set(value) >= {"text"} and _gold_like(value["text"])
    return False


def check_field_types(
    source: PromptSource, rows: Sequence[dict[str, Any]], text_fields: Sequence[str], gold_fields: Sequence[str]
) -> None:
    """Refuse rows whose fields no template or reward can read, naming the first such row and field.

    ``text_fields`` (what the template fills in, e.g. ``prompt``) must be strings: an int or a list would be
    pasted into the prompt as its Python repr. ``gold_fields`` must be text, a number, a list of them, or
    SQuAD's ``{"text": [...]}``: any other dict (or a boolean) leaves every completion of the row unscored,
    silently. A missing value (None) is not checked here: such rows are skipped and counted elsewhere.
    Raises ``ValueError`` with ``source.where(row)``, the field (and its column when ``fields`` renamed it),
    the value, and how many rows are wrong.
    """
    wrong: list[tuple[int, str, Any, str]] = []
    for index, row in enumerate(rows):
        for name in text_fields:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                wrong.append((index, name, value, "text (a JSON string)"))
        for name in gold_fields:
            value = row.get(name)
            if name not in text_fields and value is not None and not _gold_like(value):
                wrong.append((index, name, value, 'an answer: text, a number, a list of them, or {"text": [...]}'))
    if not wrong:
        return
    index, name, value, expected = wrong[0]
    column = source.column(name)
    named = f"field {name!r}" + (f" (column {column!r})" if column != name else "")
    count = len({i for i, *_ in wrong})
    raise ValueError(
        f"{source.where(index)}: {named} has type {type(value).__name__} ({value!r:.80}), it must be {expected} "
        f"({count} of {len(rows)} rows have a field of the wrong type)"
    )


def __getattr__(name: str) -> Any:
    """``lit_gcpo.data.sources.ArithmeticTask``, the task's path before it moved to ``lit_gcpo.tasks.arithmetic``
    (configs saved by earlier runs name it): resolved on first use, so that this module imports no task."""
    if name == "ArithmeticTask":
        from lit_gcpo.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
