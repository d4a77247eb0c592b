"""Evaluation benchmarks as normalised items: MATH-500, AIME24, AMC23, Minerva Math, OlympiadBench,
GSM8K (math) and HotpotQA distractor, NarrativeQA, Qasper (QA).

Every loader returns items ``{"id", "question", "context", "gold", "kind", "benchmark"}``:

* ``gold`` is one answer string for ``kind="math"`` (read by ``lit_gcpo.rewards.answers.gold_answer``: AIME's
  ``"025"`` -> ``"25"``, AMC's ``27.0`` -> ``"27"``, GSM8K's ``#### n``, Minerva's last ``\\boxed{}`` of the
  solution, OlympiadBench's ``final_answer`` list) and a list of reference strings for ``kind="qa"``;
* ``context`` is ``None`` for math; HotpotQA's ``{title, sentences}`` paragraphs become
  ``"title: sentence sentence ..."`` blocks separated by blank lines; NarrativeQA's is the summary;
  Qasper's is the paper (title, abstract, then each section's name and paragraphs);
* ``id`` is the benchmark's own id when it has one, else ``"<benchmark>-<row index>"``.

Qasper is one row per *paper* with its questions inside (``qas``); each question becomes an item (id =
``question_id``) whose references are its annotators' answers, read as the official Qasper evaluator
reads them: ``"Unanswerable"`` for an unanswerable mark, the extractive spans joined by ``", "``, else
the free-form answer, else ``"Yes"``/``"No"``; QA grading scores the best token F1 over them. Both
published layouts are read: the hub's (``full_text``/``qas`` as columns of lists, ``answers[q]`` =
``{"answer": [...], "annotation_id": [...]}``) and the release JSON's (``{paper_id: {..., "qas": [{...,
"answers": [{"answer": {...}}]}]}}``, a ``.json`` object keyed by paper id, or one paper per JSONL line).
Quirks: ``section_name`` may be null, paragraphs may be empty, ``yes_no`` is null unless the answer is a
yes/no, and an annotation with no field set has no reference (a question with none is skipped). ``limit``
counts papers.

A row whose question or gold cannot be read is left out; its id is in ``BenchmarkItems.skipped`` and a
warning gives the count. The math rewards and metrics read ``gold`` (see ``lit_gcpo.rewards``).

Sources: a local JSONL/JSON/Parquet file (read with ``datasets`` through ``LocalFiles``; this is what
the tests exercise) or the hub dataset named in each spec (the real code path, not run offline).
The layouts handled are the ones of the public files: the Qwen2.5-Math evaluation JSONL and the hub
versions where they differ (e.g. ``question`` vs ``problem``; NarrativeQA's nested hub records).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lit_gcpo.algorithms.registry import Registry
from lit_gcpo.data.sources import HubDataset, LocalFiles
from lit_gcpo.rewards.answers import extract_boxed, gold_answer

log = logging.getLogger(__name__)

Kind = Literal["math", "qa"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark.

    Attributes:
        name: registry name.
        kind: ``math`` (one gold answer) or ``qa`` (reference strings).
        hub_path, hub_name, hub_split: the hub dataset used when no local file is given.
        convert: row -> ``(question, context, gold)``; any of them None makes the row skipped.
        id_fields: fields tried, in order, for the item id.
        expand: row -> the rows of its items (Qasper: a paper -> its questions); None = one item per row.
    """

    name: str
    kind: Kind
    hub_path: str
    hub_split: str
    convert: Callable[[Mapping[str, Any]], tuple[str | None, str | None, Any]]
    hub_name: str | None = None
    id_fields: tuple[str, ...] = ("id", "unique_id", "idx")
    expand: Callable[[Mapping[str, Any]], list[Mapping[str, Any]]] | None = None


@dataclass
class BenchmarkItems:
    """The loaded items of one benchmark and the ids of the rows left out."""

    name: str
    items: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")


def _text(value: Any) -> str | None:
    """A non-empty stripped string, or None (also reads hub records' ``{"text": ...}``)."""
    if isinstance(value, Mapping):
        value = value.get("text")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first(row: Mapping[str, Any], *fields: str) -> Any:
    for name in fields:
        if row.get(name) is not None:
            return row[name]
    return None


# ------------------------------------------------------------------------------------------ converters
def _math_answer_field(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    """MATH-500, AIME24, AMC23: the question and the ``answer`` field's gold."""
    return _text(_first(row, "problem", "question")), None, gold_answer(row.get("answer"))


def _gsm8k(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    """The gold is what follows ``####`` in ``answer``; an answer without the mark has no gold."""
    answer = row.get("answer")
    gold = gold_answer(answer) if isinstance(answer, str) and "####" in answer else None
    return _text(row.get("question")), None, gold


def _minerva(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    """The last box of ``solution`` (the sample layout), or ``answer`` when a copy has one."""
    gold = gold_answer(row["answer"]) if row.get("answer") is not None else None
    if gold is None and isinstance(row.get("solution"), str):
        gold = extract_boxed(row["solution"])
    return _text(_first(row, "problem", "question")), None, gold or None


def _olympiadbench(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    """``final_answer`` (a list of ``$...$`` strings); a non-empty ``context`` precedes the question."""
    question = _text(row.get("question"))
    preamble = _text(row.get("context"))
    if question is not None and preamble is not None:
        question = f"{preamble}\n\n{question}"
    return question, None, gold_answer(row.get("final_answer"))


def _hotpotqa(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    context = row.get("context") or {}
    titles, paragraphs = context.get("title") or [], context.get("sentences") or []
    # a malformed row with more titles than paragraphs keeps the paired ones
    blocks = [f"{title}: {''.join(sentences).strip()}" for title, sentences in zip(titles, paragraphs, strict=False)]
    answer = _text(row.get("answer"))
    return _text(row.get("question")), "\n\n".join(blocks) or None, [answer] if answer else None


def _narrativeqa(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    """Sample layout (``answer`` list, ``passage``) or the hub's (``answers`` dicts, ``document.summary``)."""
    answers = _first(row, "answer", "answers")
    if isinstance(answers, (str, Mapping)):
        answers = [answers]
    references = [t for t in (_text(a) for a in answers or []) if t is not None]
    passage = row.get("passage")
    if passage is None and isinstance(row.get("document"), Mapping):
        passage = row["document"].get("summary")
    return _text(row.get("question")), _text(passage), references or None


def _columns(value: Any) -> list[dict[str, Any]]:
    """A list of records from either layout: a list of dicts, or the hub's dict of equal-length lists."""
    if isinstance(value, Mapping):
        lists = {k: v for k, v in value.items() if isinstance(v, list)}
        width = max((len(v) for v in lists.values()), default=0)
        return [{k: v[i] if i < len(v) else None for k, v in lists.items()} for i in range(width)]
    return [v for v in value or [] if isinstance(v, Mapping)]


def qasper_reference(answer: Mapping[str, Any]) -> str | None:
    """One annotator's answer as the official Qasper evaluator reads it (None: no field set)."""
    if answer.get("unanswerable"):
        return "Unanswerable"
    spans = [s for s in answer.get("extractive_spans") or [] if isinstance(s, str) and s.strip()]
    if spans:
        return ", ".join(s.strip() for s in spans)
    free_form = _text(answer.get("free_form_answer"))
    if free_form is not None:
        return free_form
    if answer.get("yes_no") is None:
        return None
    return "Yes" if answer["yes_no"] else "No"


def _qasper_paper(paper: Mapping[str, Any]) -> str:
    parts = [t for t in (_text(paper.get("title")), _text(paper.get("abstract"))) if t]
    for section in _columns(paper.get("full_text")):
        paragraphs = [p.strip() for p in section.get("paragraphs") or [] if isinstance(p, str) and p.strip()]
        heading = _text(section.get("section_name"))
        if paragraphs:
            parts.append("\n".join([heading, *paragraphs] if heading else paragraphs))
    return "\n\n".join(parts)


def _qasper_questions(paper: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A paper -> one row per question, with the paper as context and the annotators' references."""
    questions = _columns(paper.get("qas"))
    paper_id = str(_first(paper, "id", "paper_id") or "qasper-paper")
    if not questions:
        return [{"id": paper_id, "question": None}]  # skipped, by the paper's id
    context = _qasper_paper(paper)
    rows = []
    for position, qa in enumerate(questions):
        annotations = qa.get("answers")
        if isinstance(annotations, Mapping):  # hub layout: {"answer": [...], "annotation_id": [...]}
            answers = [a for a in annotations.get("answer") or [] if isinstance(a, Mapping)]
        else:  # release layout: [{"answer": {...}, "annotation_id": ...}]
            answers = [a.get("answer") for a in _columns(annotations) if isinstance(a.get("answer"), Mapping)]
        references = [r for r in (qasper_reference(a) for a in answers) if r is not None]
        rows.append(
            {
                "id": str(qa.get("question_id") or f"{paper_id}-q{position}"),
                "question": qa.get("question"),
                "context": context,
                "answers": references,
            }
        )
    return rows


def _qasper(row: Mapping[str, Any]) -> tuple[str | None, str | None, Any]:
    return _text(row.get("question")), _text(row.get("context")), row.get("answers") or None


def _register(spec: BenchmarkSpec) -> None:
    BENCHMARKS.add(spec.name, spec)


_register(BenchmarkSpec("math500", "math", "HuggingFaceH4/MATH-500", "test", _math_answer_field))
_register(BenchmarkSpec("aime24", "math", "HuggingFaceH4/aime_2024", "train", _math_answer_field))
_register(BenchmarkSpec("amc23", "math", "math-ai/amc23", "test", _math_answer_field))
_register(BenchmarkSpec("minerva_math", "math", "math-ai/minervamath", "test", _minerva))
_register(
    BenchmarkSpec("olympiadbench", "math", "Hothan/OlympiadBench", "train", _olympiadbench, "OE_TO_maths_en_COMP")
)
_register(BenchmarkSpec("gsm8k", "math", "openai/gsm8k", "test", _gsm8k, "main"))
_register(BenchmarkSpec("hotpotqa", "qa", "hotpotqa/hotpot_qa", "validation", _hotpotqa, "distractor"))
_register(BenchmarkSpec("narrativeqa", "qa", "deepmind/narrativeqa", "test", _narrativeqa))
_register(BenchmarkSpec("qasper", "qa", "allenai/qasper", "test", _qasper, expand=_qasper_questions))


def normalise_rows(spec: BenchmarkSpec, rows: list[dict[str, Any]]) -> BenchmarkItems:
    """Rows of ``spec``'s benchmark -> items; rows without a question or gold are skipped by id."""
    items: list[dict[str, Any]] = []
    skipped: list[str] = []
    if spec.expand is not None:
        rows = [dict(sub) for row in rows for sub in spec.expand(row)]
    for index, row in enumerate(rows):
        raw_id = _first(row, *spec.id_fields)
        item_id = str(raw_id) if raw_id is not None else f"{spec.name}-{index}"
        question, context, gold = spec.convert(row)
        if question is None or gold is None:
            skipped.append(item_id)
            continue
        items.append(
            {
                "id": item_id,
                "question": question,
                "context": context,
                "gold": gold,
                "kind": spec.kind,
                "benchmark": spec.name,
            }
        )
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        log.warning(
            "%s: %d of %d rows have no readable question/gold and are left out: %s",
            spec.name,
            len(skipped),
            len(rows),
            shown,
        )
    return BenchmarkItems(spec.name, items, skipped)


def load_benchmark(name: str, path: str | None = None, limit: int = 0) -> BenchmarkItems:
    """The items of benchmark ``name`` from a local file ``path`` (JSONL/JSON/Parquet) or the hub.

    Args:
        name: a registered benchmark (``BENCHMARKS.names()``).
        path: a local file in the benchmark's layout; None reads ``spec.hub_path`` from the hub.
        limit: keep only the first ``limit`` rows (0 = all), before skipping.
    """
    spec = BENCHMARKS.get(name)
    keyed = _keyed_json(path, limit) if path is not None else None
    if keyed is not None:
        return normalise_rows(spec, keyed)
    if path is not None:
        source: LocalFiles | HubDataset = LocalFiles(path, limit=limit)
    else:
        source = HubDataset(spec.hub_path, split=spec.hub_split, name=spec.hub_name, limit=limit)
    return normalise_rows(spec, source.load())


def _keyed_json(path: str, limit: int) -> list[dict[str, Any]] | None:
    """The rows of a ``.json`` file that is one object of records keyed by id (Qasper's release files),
    each with its key as ``id``; None for any other file (read by ``datasets``)."""
    if Path(path).suffix.lower() != ".json" or not Path(path).is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            document = json.load(handle)
        except json.JSONDecodeError:
            return None  # JSON lines named .json: datasets reads them
    if not isinstance(document, dict) or not document or not all(isinstance(v, dict) for v in document.values()):
        return None
    rows = [{"id": key, **value} for key, value in document.items()]
    return rows[:limit] if limit > 0 else rows
