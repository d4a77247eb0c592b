"""The paper-style table: one row per model or checkpoint, one column per benchmark, and averages.

The layout of the SEED-GRPO and GCPO result tables. Each cell is the benchmark's headline metric in
percent: ``accuracy`` (one greedy completion) or ``avg@k`` (k samples, the mean accuracy) for math, token
``f1`` for QA (the best over the references, averaged over completions). A benchmark evaluated greedy and
sampled in one run has two columns, ``<benchmark>/greedy`` and ``<benchmark>/sampled``.

Averages (project's reading: the papers average their benchmark columns with equal weight): each named
average is the plain mean of its benchmarks' headline values, one per evaluation pass (``average`` for a
run without passes, ``average/greedy`` and ``average/sampled`` with them); a model missing one of the
benchmarks gets ``-``. Default: one ``average`` over every benchmark of the table.

Several runs make one table from their ``test_benchmarks.json`` files::

    python -m lit_gcpo.evaluation.paper runs/eval/base/test_benchmarks.json runs/eval/gcpo/test_benchmarks.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Summary = Mapping[str, Mapping[str, float | None]]


def headline_metric(values: Mapping[str, float | None]) -> str | None:
    """The metric a paper reports for a benchmark: ``accuracy``, else ``avg@k``, else QA ``f1``."""
    if "accuracy" in values:
        return "accuracy"
    for name in values:
        if name.startswith("avg@"):
            return name
    return "f1" if "f1" in values else None


def _split(column: str) -> tuple[str, str]:
    benchmark, _, variant = column.partition("/")
    return benchmark, variant


def _value(summary: Summary, column: str) -> float:
    values = summary.get(column)
    metric = headline_metric(values) if values else None
    value = values.get(metric) if values and metric else None
    return math.nan if value is None else 100.0 * float(value)


def paper_rows(
    runs: Mapping[str, Summary], averages: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The table's columns and, per run label, each column's value in percent (NaN: not measured)."""
    columns: list[str] = []
    for summary in runs.values():
        columns += [c for c, v in summary.items() if c not in columns and v and headline_metric(v)]
    benchmarks = list(dict.fromkeys(_split(c)[0] for c in columns))
    variants = list(dict.fromkeys(_split(c)[1] for c in columns))
    chosen = dict(averages) if averages else {"average": benchmarks}
    for name, members in chosen.items():
        unknown = sorted(set(members) - set(benchmarks))
        if unknown:
            raise ValueError(f"average {name!r} names benchmarks not in the results: {unknown}; have {benchmarks}")
    table: dict[str, dict[str, float]] = {}
    for label, summary in runs.items():
        row = {column: _value(summary, column) for column in columns}
        for name, members in chosen.items():
            for variant in variants:
                cells = [row.get(f"{b}/{variant}" if variant else b, math.nan) for b in members]
                key = f"{name}/{variant}" if variant else name
                row[key] = sum(cells) / len(cells) if cells else math.nan  # NaN if any is missing
        table[label] = row
    average_columns = [f"{n}/{v}" if v else n for n in chosen for v in variants]
    return columns + average_columns, table


def format_paper_table(runs: Mapping[str, Summary], averages: Mapping[str, Sequence[str]] | None = None) -> str:
    """A Markdown table, one row per run label, cells in percent with one decimal (``-``: not measured)."""
    columns, table = paper_rows(runs, averages)
    metric_of = {}
    for column in columns:
        for summary in runs.values():
            if summary.get(column):
                metric_of[column] = headline_metric(summary[column])
                break
    header = ["model", *(f"{c} ({metric_of[c]})" if c in metric_of else c for c in columns)]
    body = [[label, *("-" if math.isnan(row[c]) else f"{row[c]:.1f}" for c in columns)] for label, row in table.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(r) for r in body)])


def load_runs(paths: Sequence[str | Path]) -> tuple[dict[str, Summary], dict[str, list[str]] | None]:
    """Run label -> summary from ``test_benchmarks.json`` files (the label is the run's, else the file's
    directory); the averages of the first file that names some."""
    runs: dict[str, Summary] = {}
    averages = None
    for path in paths:
        document = json.loads(Path(path).read_text())
        if "summary" not in document:
            raise ValueError(f"{path}: not a test_benchmarks.json file (no 'summary')")
        label = document.get("label") or Path(path).parent.name
        if label in runs:
            label = f"{label} ({path})"
        runs[label] = document["summary"]
        averages = averages or document.get("averages")
    return runs, averages


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="One paper-style table from several evaluation runs.")
    parser.add_argument("files", nargs="+", help="test_benchmarks.json files of lit-gcpo test runs")
    args = parser.parse_args(argv)
    runs, averages = load_runs(args.files)
    table = format_paper_table(runs, averages)
    print(table)
    return table


if __name__ == "__main__":  # pragma: no cover
    main()
