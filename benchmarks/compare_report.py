"""The method comparison's tables and figures, regenerated from the results file alone (issue 20).

Reads only ``benchmarks/results/compare_methods.jsonl`` (one record per finished (testbed, method, seed) run of
``compare_methods.py``) and writes, for every (testbed, design) group
(``lit_gcpo.evaluation.comparison.design_of``: runs of different designs are never paired, runs of different
``config_sha`` of one method never pooled):

- per method: runs, starting accuracy, final greedy validation accuracy and its gain over the start (mean ± sample
  std over seeds), the area under the validation curve (mean accuracy over the run), the weight spread;
- the paired contrasts of ``lit_gcpo.evaluation.comparison.contrast_table`` (primary family with Holm over its 4
  contrasts, secondary ``every method - grpo`` with Holm over its own): mean difference, percentile-bootstrap 95%
  interval over seeds, sign-flip p, Holm p, and the smallest effect detectable at 80% power;

into the section ``compare_report`` of ``benchmarks/RESULTS.md`` and, when the README holds the markers
``<!-- begin compare_report -->`` / ``<!-- end compare_report -->``, between them (nothing else of the README is
touched); and the figures ``compare_curves.png`` (validation curves, mean and 95% band per method, one panel per
group) and ``compare_forest.png`` (the paired contrasts, primary highlighted) in ``benchmarks/figures/``.

    python benchmarks/compare_report.py                                  # the committed results file
    python benchmarks/compare_report.py runs/other.jsonl --no-write      # print only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIGURES, RESULTS, write_results_section
from compare_methods import read_records

from lit_gcpo.evaluation.comparison import PRIMARY, ContrastRow, contrast_table, group_records, method_outcomes

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "compare_methods.jsonl"
SECTION = "compare_report"
CURVES, FOREST = "compare_curves.png", "compare_forest.png"
OUTCOME_LABELS = {"final_accuracy": "final accuracy", "auc": "AUC"}
FLAT_WEIGHTS = 0.02  # METHODS.md §5.1: a weighting whose weight std stays below this is, for that run, GRPO


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL results file, read as the runner reads them (``compare_methods.read_records``: blank
    lines and a line torn by a kill mid-write skipped)."""
    records = read_records(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _mean_std(values: np.ndarray, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    std = f"{values.std(ddof=1):.{digits}f}" if values.size > 1 else "n/a"
    return f"{values.mean():{sign}.{digits}f} ± {std}"


def _field(records: Sequence[Mapping[str, Any]], key: str, reduce: Any = np.mean) -> float:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return float(reduce(values)) if values else math.nan


def _number(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def method_table(members: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per method of one group: n, start, final accuracy, gain, AUC (mean ± std over seeds) and weight spread."""
    lines = [
        "| method | runs | start accuracy | final accuracy, mean ± std | gain over start | AUC (mean accuracy "
        "over the run) | weight std per step, mean | weight min – max | truncated at the end, mean | config_sha |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, outcome in method_outcomes(members).items():
        runs = [r for r in members if r["method"] == method]
        spread = _field(runs, "weight_std_mean")
        low, high = _field(runs, "weight_min", np.min), _field(runs, "weight_max", np.max)
        flat = " (flat: GRPO)" if method != "grpo" and spread < FLAT_WEIGHTS else ""
        lines.append(
            f"| {method} | {outcome['seed'].size} | {outcome['start'].mean():.3f} "
            f"| {_mean_std(outcome['final_accuracy'])} | {_mean_std(outcome['gain'], signed=True)} "
            f"| {_mean_std(outcome['auc'])} | {_number(spread)}{flat} | {_number(low, 2)} – {_number(high, 2)} "
            f"| {_number(_field(runs, 'truncated_frac_final'))} | `{runs[0]['config_sha']}` |"
        )
    return lines


def contrast_lines(rows: Sequence[ContrastRow]) -> list[str]:
    """The contrast table of one group, primary family first: outcome, contrast, n, mean, interval, p, Holm p, MDE."""
    lines = [
        "| family | outcome | contrast | n | mean difference | 95% bootstrap interval | sign-flip p | Holm p "
        "| detectable at 80% power |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r.family != "primary"):  # primary first, order kept otherwise
        if row.n < 2:
            cells = [f"{row.mean:+.3f}" if row.n else "—", "—", "—", "—", "—"]
        else:
            p = f"{row.p:.4f}" + ("" if row.exact else " (r)")
            interval = f"[{row.low:+.3f}, {row.high:+.3f}]"
            cells = [f"{row.mean:+.3f}", interval, p, f"{row.p_holm:.4f}", f"{row.mde:.3f}"]
        label = OUTCOME_LABELS[row.outcome]
        lines.append(f"| {row.family} | {label} | {row.name} | {row.n} | {' | '.join(cells)} |")
    return lines


def group_labels(groups: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A short name per (testbed, design): the testbed, numbered ``#1``, ``#2``, ... when it has several designs."""
    labels = {}
    for testbed, design in groups:
        designs = [d for t, d in groups if t == testbed]
        labels[testbed, design] = testbed if len(designs) == 1 else f"{testbed} #{designs.index(design) + 1}"
    return labels


def group_title(label: str, members: Sequence[Mapping[str, Any]]) -> str:
    first = members[0]
    commits = ", ".join(sorted({str(r.get("commit", "?"))[:9] for r in members}))
    design = f"design_sha `{first['design_sha']}`; " if first.get("design_sha") else ""
    return (
        f"**{label}** ({design}config `{first.get('config', '?')}`, {first['steps']} steps of "
        f"{first['batch_size']} prompts x G = {first['group_size']}, {first['val_size']} validation prompts; "
        f"{len(members)} runs; commits {commits})"
    )


def report_lines(
    records: Sequence[Mapping[str, Any]], rows: Sequence[ContrastRow], source: str, resamples: int, figures: list[str]
) -> list[str]:
    """The generated body (no title): definitions, then per group the method and contrast tables, then figures."""
    last = max(str(r.get("finished_at", "")) for r in records)
    primary = ", ".join(f"`{a} - {b}`" for a, b in PRIMARY)
    lines = [
        f"Generated by `python benchmarks/compare_report.py` from `{source}` ({len(records)} runs, the last finished "
        f"{last or 'at an unrecorded time'}). Paired by seed within a (testbed, design) group (design: the runs' "
        "design_sha when recorded, else config file and budget; a method's runs of two config_sha in one design are "
        f"an error); primary family {primary} (Holm over the 4), secondary every method - grpo (Holm over that "
        "family), each for the final greedy validation accuracy and the AUC (trapezoid area of the validation curve "
        "over its step span: the mean accuracy over the run). Interval: percentile bootstrap over seeds, "
        f"{resamples:,} resamples. p: two-sided sign-flip permutation test, exact over the 2^n sign patterns up to 16 "
        "seeds, (r) = 100,000 random patterns with the +1 correction. Detectable at 80% power: (t_{0.975, n-1} + "
        "t_{0.8, n-1}) s / sqrt(n), s the std of the paired differences. A contrast with fewer than 2 paired seeds "
        "shows —.",
    ]
    groups = group_records(records)
    labels = group_labels(list(groups))
    for key, members in groups.items():
        group = [r for r in rows if (r.testbed, r.design) == key]
        passed = [f"{r.name} ({OUTCOME_LABELS[r.outcome]})" for r in group if r.family == "primary" and r.p_holm < 0.05]
        lines += ["", group_title(labels[key], members), "", *method_table(members), "", *contrast_lines(group), ""]
        lines.append(f"Primary contrasts with Holm p < 0.05: {', '.join(passed) or 'none'}. {_power(group)}")
    return [*lines, "", *figures]


def _power(rows: Sequence[ContrastRow]) -> str:
    """One sentence: the range of the primary contrasts' detectable effects at 80% power, per outcome."""
    parts = []
    for outcome, label in OUTCOME_LABELS.items():
        computed = [r for r in rows if r.family == "primary" and r.outcome == outcome and r.n >= 2]
        if computed:
            mde = [r.mde for r in computed]
            seeds = sorted({r.n for r in computed})
            parts.append(f"{label} {min(mde):.3f} – {max(mde):.3f} ({'/'.join(map(str, seeds))} seeds)")
    return (
        "Design power: the primary contrasts detect paired effects at 80% power (two-sided 0.05) of "
        f"{'; '.join(parts) or 'n/a (no primary contrast pairs 2 seeds)'}, from the observed spread of the differences."
    )


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Validation accuracy against step: per method the mean over seeds and its 95% t-interval band (none for
    a single seed), one panel per (testbed, design) group."""
    plt = _plt()
    groups = group_records(records)
    columns = min(2, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(groups) :]:
        axis.set_visible(False)
    labels = group_labels(list(groups))
    for axis, (key, members) in zip(axes.flat, groups.items(), strict=False):
        for index, method in enumerate(method_outcomes(members)):
            curves = np.array([r["val_curve"] for r in members if r["method"] == method], dtype=float)  # [n, K, 2]
            steps, accuracy = curves[0, :, 0], curves[:, :, 1]  # [K], [n, K]
            mean = accuracy.mean(0)
            axis.plot(steps, mean, color=f"C{index}", label=f"{method} (n = {len(curves)})")
            if len(curves) > 1:
                half = stats.t.ppf(0.975, len(curves) - 1) * accuracy.std(0, ddof=1) / math.sqrt(len(curves))
                # accuracies lie in [0, 1]: the t-band of a few seeds overshoots
                low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
                axis.fill_between(steps, low, high, color=f"C{index}", alpha=0.15)
        axis.set_title(labels[key], fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("greedy validation accuracy")
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forest(rows: Sequence[ContrastRow], path: Path) -> None:
    """Mean paired difference and 95% bootstrap interval of every contrast with >= 2 seeds, one panel per outcome;
    primary contrasts in red and bold, secondary ones (a primary contrast is not repeated) in grey."""
    plt = _plt()
    primary_names = {f"{a} - {b}" for a, b in PRIMARY}
    shown = [r for r in rows if r.n >= 2 and (r.family == "primary" or r.name not in primary_names)]
    outcomes = list(OUTCOME_LABELS)
    names = group_labels(list(dict.fromkeys((r.testbed, r.design) for r in rows)))
    labels = list(dict.fromkeys((names[r.testbed, r.design], r.name, r.family) for r in shown))
    height = 1.5 + 0.3 * len(labels)
    fig, axes = plt.subplots(1, len(outcomes), figsize=(6 * len(outcomes), height), squeeze=False, sharey=True)
    for axis, outcome in zip(axes[0], outcomes, strict=True):
        for row in (r for r in shown if r.outcome == outcome):
            y = -labels.index((names[row.testbed, row.design], row.name, row.family))
            color = "C3" if row.family == "primary" else "grey"
            axis.plot([row.low, row.high], [y, y], color=color, linewidth=2 if row.family == "primary" else 1)
            axis.plot(row.mean, y, "o", color=color)
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_xlabel(f"paired difference, {OUTCOME_LABELS[outcome]}")
    axes[0, 0].set_yticks([-i for i in range(len(labels))], [f"{group}: {name}" for group, name, _ in labels])
    for tick, (*_, family) in zip(axes[0, 0].get_yticklabels(), labels, strict=True):
        if family == "primary":
            tick.set_fontweight("bold")
            tick.set_color("C3")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_links(figures: Path, target: Path) -> list[str]:
    """Markdown images of both figures, relative to the file ``target`` that shows them."""
    relative = {name: os.path.relpath(figures / name, target.parent) for name in (CURVES, FOREST)}
    return [
        f"![validation curves: mean and 95% band per method]({relative[CURVES]})",
        "",
        f"![paired contrasts: mean and 95% bootstrap interval, primary in red]({relative[FOREST]})",
    ]


def write_readme(readme: Path, lines: list[str]) -> bool:
    """Replace the README's ``compare_report`` section when both of its markers exist; nothing otherwise."""
    text = readme.read_text() if readme.exists() else ""
    if f"<!-- begin {SECTION} -->" not in text or f"<!-- end {SECTION} -->" not in text:
        return False
    write_results_section(SECTION, lines, path=readme)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(DEFAULT_RESULTS), help="the JSONL results file")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (>= 10,000 to report)")
    parser.add_argument("--permutations", type=int, default=100_000, help="random sign patterns beyond 16 seeds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the random sign patterns")
    parser.add_argument("--results-md", default=str(RESULTS), help="the markdown file of the results section")
    parser.add_argument("--readme", default=str(REPO / "README.md"), help="written only between its markers")
    parser.add_argument("--figures", default=str(FIGURES), help="folder of the two figures")
    parser.add_argument("--no-write", action="store_true", help="print only; write no file")
    args = parser.parse_args(argv)
    path = Path(args.results)
    records = load_records(path)
    rows = contrast_table(records, args.resamples, args.permutations, args.seed)
    source = os.path.relpath(path.resolve(), REPO) if path.resolve().is_relative_to(REPO) else str(path)
    results_md, readme, figures = Path(args.results_md), Path(args.readme), Path(args.figures)
    body = report_lines(records, rows, source, args.resamples, figure_links(figures, results_md))
    title = ["## Method comparison: paired contrasts over seeds (compare_report.py)", ""]
    print("\n".join([*title, *body]))
    if args.no_write:
        return
    plot_curves(records, figures / CURVES)
    plot_forest(rows, figures / FOREST)
    write_results_section(SECTION, [*title, *body], path=results_md)
    readme_body = report_lines(records, rows, source, args.resamples, figure_links(figures, readme))
    if write_readme(readme, readme_body):
        print(f"README section {SECTION} rewritten: {readme}")


if __name__ == "__main__":
    main()
