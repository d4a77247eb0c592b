"""Rollout batches -> per-item evaluation records -> per-benchmark metrics (torchmetrics), a text table,
JSON and CSV files.

A record is one prompt (benchmark item) with its k completions::

    {"benchmark", "variant", "kind", "id", "index", "prompt", "prompt_tokens", "over_context", "gold",
     "completions": [k str], "answers": [k str | None], "correct": [k bool], "f1": [k float] | None,
     "lengths": [k int], "truncated": [k bool] | None,
     "majority_answer": str | None, "majority_correct": bool, "signals": {name: float | None},
     "grading_problems": [k str | None] | None}

``grading_problems``: why Math-Verify gave no verdict or result in a completion's grading (a timeout, an exception,
the grading process dying), per completion: its comparison with the gold (graded wrong), the extraction of its
answer by the ``math_verify`` fallback (no answer), a comparison of the majority vote placing it (not equivalent),
the majority answer's with the gold, or a comparison of the answer clustering of the signals placing it (not
equivalent); None when nothing failed. ``no_verdict`` counts such completions per
benchmark (in the metrics only when some are).

Records are reported by ``benchmark`` and evaluation pass: ``<benchmark>/<variant>`` when the row names
a variant (``greedy``/``sampled``, see ``BenchmarkSource``), else ``<benchmark>``.

Metrics per benchmark (``n`` completions per item):

* math: ``accuracy`` (``GreedyAccuracy``) when n = 1; else ``avg@n``, unbiased ``pass@k`` for each k of
  ``pass_ks`` (default 1, 2, 4, ... up to n, and n) and ``maj@n``;
* QA: ``em`` and ``f1`` over all completions, and ``pass@k`` (on exact match) when n > 1;
* ``auroc_<signal>`` for each uncertainty signal present (``IncorrectnessAUROC``: the signal ranking the
  items whose majority answer is wrong above the others; NaN with one class or n = 1);
* ``length_mean`` (completion tokens) and ``truncated_frac`` (share of completions that hit
  ``max_new_tokens``);
* ``items`` (graded items), ``skipped`` (items left out: an unreadable gold, or a prompt longer than the
  context with ``data.long_prompts: skip``) and ``over_context``: items whose prompt, before any cut, was
  longer than the context leaves (graded after truncation, or skipped), counted by the DataModule; also a
  graded prompt longer than ``context_length`` when that is given (for a DataModule that did not know it);
* ``no_verdict``: completions with ``grading_problems`` (only when there are some).

The metrics are computed from the records alone (their answers, grades and signals), so every number
in the files can be recomputed from the saved items.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation.calibration import AUROC_SIGNALS, prompt_signals
from lit_gcpo.evaluation.grading import (
    KINDS,
    Grade,
    gold_references,
    grade_answer,
    grade_completion,
    majority_and_problems,
    math_verdict,
    no_blank,
)
from lit_gcpo.evaluation.metrics import (
    QAF1,
    AverageAtK,
    GreedyAccuracy,
    IncorrectnessAUROC,
    MajorityAtK,
    PassAtK,
    QAExactMatch,
)

Record = dict[str, Any]
# The records are gathered from every rank before any metric sees them: a metric syncing its own states
# across ranks would count every item world-size times.
_LOCAL: dict[str, Any] = {"sync_on_compute": False}
_SIGNAL_COLUMNS = ("se", "se_n", "num_clusters", "cd", "bot", "rd", "u_c")


def rollout_records(
    batch: RolloutBatch,
    *,
    default_benchmark: str = "benchmark",
    geometric: str = "bot",
    reward_range: tuple[float, float] = (0.0, 1.0),
    first_index: int = 0,
    fallback: str = "none",
) -> list[Record]:
    """One record per prompt of a rollout batch: its completions graded, majority answer, signals.

    Rows are read for ``kind`` (default ``math``), ``gold`` (else ``answer``), ``benchmark`` (default
    ``default_benchmark``), ``id`` and ``index`` (default: ``first_index`` + position in the batch). Math
    answers are the batch's ``answers`` (the rollout's ``final_answer``) when present; a math completion
    without a box is read by ``fallback`` (``lit_gcpo.evaluation.grading.read_answer``).
    """
    group_ids = batch.group_ids.detach().cpu().long()  # [N]
    kinds = [str(row.get("kind") or "math") for row in batch.rows]  # [B]
    for position, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ValueError(f"row {position} of the batch has kind {kind!r}; valid: {', '.join(KINDS)}")
    golds = [row.get("gold", row.get("answer")) for row in batch.rows]  # [B]
    lengths = batch.completion_mask.detach().cpu().sum(-1).long()  # [N]
    prompt_tokens = batch.attention_mask.detach().cpu().sum(-1).long() - lengths  # [N]
    truncated = None if batch.truncated is None else batch.truncated.detach().cpu().bool().tolist()  # [N]
    grades = [_completion_grade(batch, n, kinds[g], golds[g], fallback) for n, g in enumerate(group_ids.tolist())]
    unclustered: dict[int, list[tuple[int, str]]] = {}  # completion -> (other, why) of the clustering's failures
    signals = prompt_signals(
        group_ids,
        [grade.answer for grade in grades],
        kinds,
        rewards=batch.rewards,
        embeddings=batch.embeddings,
        seq_logprobs=batch.seq_logprobs,
        geometric=geometric,
        reward_range=reward_range,
        on_no_verdict=lambda n, other, why: unclustered.setdefault(n, []).append((other, why)),
    )  # {name: [B]}
    records = []
    for b, row in enumerate(batch.rows):
        members = torch.nonzero(group_ids == b).flatten().tolist()
        mine = [grades[n] for n in members]
        clustering = [
            [f"answer clustering, against completion {members.index(o)}: {why}" for o, why in unclustered.get(n, [])]
            for n in members
        ]
        majority, problems = majority_and_problems(kinds[b], golds[b], mine, clustering)
        index = int(row.get("index", first_index + b))
        records.append(
            {
                "benchmark": str(row.get("benchmark") or default_benchmark),
                "variant": str(row.get("variant") or ""),
                "kind": kinds[b],
                "id": str(row.get("id", f"{default_benchmark}-{index}")),
                "index": index,
                "prompt": batch.prompts[b],
                "prompt_tokens": int(prompt_tokens[members[0]]) if members else 0,
                "over_context": bool(row.get("over_context", False)),  # cut to fit (DataModule)
                "gold": golds[b] if kinds[b] == "qa" else (gold_references("math", golds[b]) or [None])[0],
                "completions": [batch.completions[n] for n in members],
                "answers": [g.answer for g in mine],
                "correct": [g.correct for g in mine],
                "f1": [g.f1 for g in mine] if kinds[b] == "qa" else None,
                "lengths": [int(lengths[n]) for n in members],
                "truncated": None if truncated is None else [truncated[n] for n in members],
                "majority_answer": majority.answer,
                "majority_correct": majority.correct,
                "signals": {name: _number(value[b]) for name, value in signals.items()},
                "grading_problems": problems,
            }
        )
    return records


def _completion_grade(batch: RolloutBatch, n: int, kind: str, gold: Any, fallback: str) -> Grade:
    """Completion ``n``'s grade: of the rollout's answer (math, when the batch has one), else of the answer read from
    its text (``grade_completion``: an extraction without a result is its ``problem``)."""
    if kind == "math" and batch.answers is not None and batch.answers[n] is not None:
        return grade_answer(kind, no_blank(batch.answers[n]), gold)
    return grade_completion(kind, batch.completions[n], gold, fallback)


def missing_verdicts(records: Sequence[Record]) -> dict[str, list[str]]:
    """Per benchmark (and pass), ``item <id> completion <j>: <why>`` for each completion whose grading got no verdict
    or result from Math-Verify (its ``grading_problems``)."""
    found: dict[str, list[str]] = {}
    for record in records:
        name = record["benchmark"] + (f"/{record['variant']}" if record.get("variant") else "")
        for position, problem in enumerate(record.get("grading_problems") or []):
            if problem is not None:
                found.setdefault(name, []).append(f"item {record['id']} completion {position}: {problem}")
    return found


def _number(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def default_pass_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _samples_per_item(records: Sequence[Record]) -> int:
    counts = {len(r["completions"]) for r in records}
    if len(counts) != 1:
        raise ValueError(
            f"benchmark {records[0]['benchmark']!r}: items have different numbers of completions {sorted(counts)}"
        )
    return counts.pop()


def _correct_matrix(records: Sequence[Record]) -> torch.Tensor:
    return torch.tensor([[float(c) for c in r["correct"]] for r in records], dtype=torch.float64)  # [I, n]


def _signal(records: Sequence[Record], name: str) -> torch.Tensor:
    values = [r["signals"].get(name) for r in records]
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)  # [I]


def report_name(record: Record) -> str:
    """``<benchmark>/<variant>``, or ``<benchmark>`` for a benchmark's only evaluation pass."""
    variant = record.get("variant") or ""
    return f"{record['benchmark']}/{variant}" if variant else record["benchmark"]


def _length_metrics(records: Sequence[Record], context_length: int | None) -> dict[str, float]:
    lengths = [n for r in records for n in r.get("lengths") or []]
    values = {"length_mean": sum(lengths) / len(lengths) if lengths else math.nan}
    flags = [r.get("truncated") for r in records]
    if all(f is not None for f in flags):
        every = [bool(t) for f in flags for t in f]
        values["truncated_frac"] = sum(every) / len(every) if every else math.nan
    over = [
        bool(r.get("over_context")) or (context_length is not None and r.get("prompt_tokens", 0) > context_length)
        for r in records
    ]
    if context_length is not None or any(over):
        values["over_context"] = float(sum(over))
    return values


def benchmark_metrics(
    records: Sequence[Record], pass_ks: Sequence[int] | None = None, context_length: int | None = None
) -> dict[str, float]:
    """The metrics of one benchmark's records (all of one kind and one completion count)."""
    if not records:
        return {"items": 0.0}
    kind = records[0]["kind"]
    n = _samples_per_item(records)
    correct = _correct_matrix(records)  # [I, n]
    values: dict[str, float] = {"items": float(len(records))}
    ks = [k for k in (pass_ks if pass_ks is not None else default_pass_ks(n)) if k <= n]
    if kind == "math":
        if n == 1:
            metric: Any = GreedyAccuracy(**_LOCAL)
            metric.update(correct[:, 0])
            values["accuracy"] = float(metric.compute())
        else:
            metric = AverageAtK(n, **_LOCAL)
            metric.update(correct)
            values[f"avg@{n}"] = float(metric.compute())
            majority = MajorityAtK(n, equivalent=math_verdict, **_LOCAL)  # failures: warned
            majority.update([r["answers"] for r in records], [gold_references("math", r["gold"])[0] for r in records])
            values[f"maj@{n}"] = float(majority.compute())
    else:
        predictions = [a for r in records for a in r["answers"]]  # one row per completion; None: no answer
        refs = [gold_references("qa", r["gold"]) for r in records for _ in r["answers"]]
        for name, metric in (("em", QAExactMatch(**_LOCAL)), ("f1", QAF1(**_LOCAL))):
            metric.update(predictions, refs)
            values[name] = float(metric.compute())
    if n > 1:
        for k in ks:
            pass_k = PassAtK(k, **_LOCAL)
            pass_k.update(correct)
            values[f"pass@{k}"] = float(pass_k.compute())
    values.update(_length_metrics(records, context_length))
    failed = sum(problem is not None for r in records for problem in r.get("grading_problems") or [])
    if failed:
        values["no_verdict"] = float(failed)
    majority_correct = torch.tensor([float(r["majority_correct"]) for r in records])  # [I]
    present = {name for r in records for name, v in r["signals"].items() if v is not None}
    for name in AUROC_SIGNALS:
        if name in present:
            auroc = IncorrectnessAUROC(**_LOCAL)
            auroc.update(_signal(records, name), majority_correct)
            values[f"auroc_{name}"] = float(auroc.compute())
    return values


def summarise(
    records: Sequence[Record],
    skipped: Mapping[str, Sequence[str]] | None = None,
    pass_ks: Sequence[int] | None = None,
    context_length: int | None = None,
    too_long: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-benchmark (and pass) metrics, in order of first appearance.

    ``skipped``: ids left out for an unreadable gold; ``too_long``: ids left out because the prompt was longer
    than the context (``long_prompts: skip``); both by benchmark. ``skipped`` counts both, ``over_context``
    the second and the graded items whose prompt was cut.
    """
    skipped, too_long = skipped or {}, too_long or {}
    by_benchmark: dict[str, list[Record]] = {}
    for record in records:
        by_benchmark.setdefault(report_name(record), []).append(record)
    summary = {}
    for name, items in by_benchmark.items():
        values = benchmark_metrics(items, pass_ks, context_length)
        benchmark = items[0]["benchmark"]
        dropped = len(too_long.get(benchmark, ()))
        left_out = len(skipped.get(benchmark, ())) + dropped
        summary[name] = {"items": values.pop("items"), "skipped": float(left_out), **values}
        if dropped or "over_context" in values:
            summary[name]["over_context"] = values.get("over_context", 0.0) + dropped
    reported = {r["benchmark"] for r in records}
    for name in [*skipped, *too_long]:
        if name not in reported and name not in summary:
            dropped = len(too_long.get(name, ()))
            summary[name] = {"items": 0.0, "skipped": float(len(skipped.get(name, ())) + dropped)}
            if dropped:
                summary[name]["over_context"] = float(dropped)
    return summary


_COUNTS = ("items", "skipped", "over_context", "no_verdict")


def _cell(column: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    return str(int(value)) if column in _COUNTS else f"{value:.4f}"


def format_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table: one row per benchmark, one column per metric (``-`` = not defined)."""
    columns: list[str] = []
    for values in summary.values():
        columns += [c for c in values if c not in columns]
    header = ["benchmark", *columns]
    rows = [[name, *(_cell(c, values.get(c, math.nan)) for c in columns)] for name, values in summary.items()]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(r) for r in rows)])


def jsonable(value: Any) -> Any:
    """NaN -> None (strict JSON), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_results(
    directory: str | Path,
    stem: str,
    summary: Mapping[str, Mapping[str, float]],
    records: Sequence[Record],
    skipped: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    paper_table: str | None = None,
) -> dict[str, Path]:
    """Write ``<stem>_benchmarks.json`` (summary, skipped ids, items, and ``extra`` keys such as the run's
    label), ``<stem>_items.csv`` (one row per item), ``<stem>_summary.csv`` (one row per benchmark),
    ``<stem>_table.md`` and, when given, ``<stem>_paper.md``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / f"{stem}_benchmarks.json",
        "items_csv": directory / f"{stem}_items.csv",
        "summary_csv": directory / f"{stem}_summary.csv",
        "table": directory / f"{stem}_table.md",
    }
    document = {**(extra or {}), "summary": summary, "skipped": {k: list(v) for k, v in (skipped or {}).items()}}
    document["items"] = records
    paths["json"].write_text(json.dumps(jsonable(document), indent=1, ensure_ascii=False, allow_nan=False))
    item_columns = ["benchmark", "variant", "id", "kind", "prompt", "prompt_tokens", "gold", "completions"]
    item_columns += ["answers", "correct", "f1", "lengths", "truncated", "over_context"]
    item_columns += ["majority_answer", "majority_correct", *_SIGNAL_COLUMNS]
    with paths["items_csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=item_columns)
        writer.writeheader()
        for record in records:
            row = {c: record.get(c) for c in item_columns if c not in _SIGNAL_COLUMNS}
            for column in ("gold", "completions", "answers", "correct", "f1", "lengths", "truncated"):
                row[column] = json.dumps(jsonable(record.get(column)), ensure_ascii=False)
            for name in _SIGNAL_COLUMNS:
                value = record["signals"].get(name)
                row[name] = "" if value is None or math.isnan(value) else repr(float(value))
            writer.writerow(row)
    metric_columns: list[str] = []
    for values in summary.values():
        metric_columns += [c for c in values if c not in metric_columns]
    with paths["summary_csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["benchmark", *metric_columns])
        for name, values in summary.items():
            cells = [values.get(c, math.nan) for c in metric_columns]
            writer.writerow([name, *("" if math.isnan(v) else repr(float(v)) for v in cells)])
    paths["table"].write_text(format_table(summary) + "\n")
    if paper_table is not None:
        paths["paper"] = directory / f"{stem}_paper.md"
        paths["paper"].write_text(paper_table + "\n")
    return paths
