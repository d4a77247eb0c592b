"""Does an uncertainty signal track the variance of the policy gradient? (METHODS.md section 6)

A thin script over ``lit_gcpo.algorithms.faithfulness``. For every prompt of a ``Setting``
(``faithfulness_testbeds``: the arithmetic task's validation problems, the noisy task's training problems, a JSONL
file with ``prompt``/``answer``, or a testbed of ``compare_methods.py`` with its own prompts, reward, sampling and
signals), G completions are sampled from the policy (``HFEngine`` + ``RolloutCollector``), rewarded, and scored by
``GRPOModule.score_rollout`` (generating-policy log-probs and mean-pooled last hidden states, as in training); the
signals come from ``uncertainty_signals`` with the training defaults (Rao SE over the setting's clusters, embeddings
centred over each chunk of prompts, METHODS.md §5.1); V from ``completion_gradients`` + ``gradient_variance`` with
GRPO advantages; the correlations (all prompts, RD > 0, within strata of k correct completions, partial for
length), the paired differences between signals and the bootstrap intervals from ``faithfulness`` and
``correlation_differences``; on a noisy testbed, each weighting's weights on noisy versus clean prompts of equal k
from ``weight_ratio_by_k``.

``--compare-dir`` diagnoses the final policies of ``compare_methods.py`` chosen from its records (the issue-20
design's by default, ``--design`` for another; ``--policy-seed``, ``--testbeds``, ``--methods``), each on its
testbed's setting: one table row per policy, and per noisy arm a table of every weighting's noisy / clean ratio.

    python benchmarks/uncertainty_faithfulness.py                          # starting tiny policy, 1024 x 8
    python benchmarks/uncertainty_faithfulness.py --compare-dir /work/runs/compare --num-prompts 300
        # seed 0's final policy of every testbed and method of the issue-20 comparison
    python benchmarks/uncertainty_faithfulness.py --compare-dir runs/compare_family --design 0cbbcc92
    python benchmarks/uncertainty_faithfulness.py --model PATH --device cuda --prompts data.jsonl \\
        --params 'lm_head|layers\\.2[0-9]\\.'
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import resolve_policy, run_header, write_results_section
from compare_methods import METHODS, RESULTS_FILE, TESTBEDS, read_records
from faithfulness_diagnosis import SIGNAL_LABELS, WEIGHTINGS, Diagnosis, diagnose
from faithfulness_testbeds import Target, compare_targets, legacy_setting

from lit_gcpo.algorithms.faithfulness import LENGTH

SECTION = "uncertainty_faithfulness"


def table(diagnosis: Diagnosis) -> list[str]:
    """The correlation table, then the paired differences between signals."""
    strata = diagnosis.strata
    lines = [
        f"| signal | Spearman with V, all prompts | prompts with RD > 0 | same, within equal-{strata} strata "
        "| same as RD > 0, partial for completion length |",
        "|---|---|---|---|---|",
    ]
    for name, label in SIGNAL_LABELS.items():
        row = diagnosis.results[name]
        cells = (row.all_prompts, row.spread_prompts, row.within_strata, row.partial_length)
        lines.append(f"| {label} | {' | '.join(map(str, cells))} |")
    lines += [
        "",
        f"| difference of Spearman with V | prompts with RD > 0 | within equal-{strata} strata |",
        "|---|---|---|",
    ]
    for name, difference in diagnosis.differences.items():
        lines.append(f"| {name} | {difference.spread_prompts} | {difference.within_strata} |")
    return lines


def reading(diagnosis: Diagnosis) -> str:
    """Plain words derived from the numbers only (intervals decide, not point estimates)."""
    results, differences = diagnosis.results, diagnosis.differences
    versus_se = differences["bot - se"].spread_prompts
    length = results[LENGTH].spread_prompts
    above_length = [n for n in ("se", "bot") if differences[f"{n} - {LENGTH}"].spread_prompts.low > 0]
    partial = [n for n in ("se", "cd", "bot", "u_c") if results[n].partial_length.low > 0]
    positive_within = [n for n in ("se", "cd", "bot", "u_c") if results[n].within_strata.low > 0]
    if versus_se.excludes_zero:
        verdict = f"{'exceeds' if versus_se.low > 0 else 'trails'} SE's (paired interval of the difference {versus_se})"
    else:
        verdict = f"is not separated from SE's (paired interval of the difference {versus_se} covers 0)"
    return (
        f"Reading (generated from the numbers): on the prompts with RD > 0, BoT's correlation with V {verdict}; "
        f"paired interval above the length control ({length.value:+.2f}): {', '.join(above_length) or 'none'} (of "
        f"SE, BoT); partial correlation for length above 0: {', '.join(partial) or 'none'}; within equal-"
        f"{diagnosis.strata} strata, intervals above 0: {', '.join(positive_within) or 'none'}. A signal that does no "
        "better than length is no evidence for geometry; one policy and one task per row, not a verdict on the paper."
    )


def ratio_text(ratio: float) -> str:
    """A weight ratio, ``n/a`` when no stratum holds both noisy and clean prompts."""
    return "n/a" if math.isnan(ratio) else f"{ratio:.3f}"


def compare_row(target: Target, diagnosis: Diagnosis) -> str:
    """One final policy's row: rho on the RD > 0 prompts, BoT - SE, BoT partial and within strata, own weights."""
    results = diagnosis.results
    cells = [str(results[n].spread_prompts) for n in ("se", "cd", "bot", "u_c", LENGTH)]
    cells += [str(diagnosis.differences["bot - se"].spread_prompts), str(results["bot"].partial_length)]
    cells.append(f"{results['bot'].within_strata} ({diagnosis.strata})")
    own = diagnosis.noise_ratios.get(target.method)
    cells.append(ratio_text(own.ratio) if own is not None else "—")
    return f"| {target.testbed} | {target.method} | {diagnosis.spread_prompts} | {' | '.join(cells)} |"


def noise_row(target: Target, diagnosis: Diagnosis) -> str:
    """A noisy testbed's policy: each weighting's noisy / clean ratio within equal-k strata (unmatched in brackets)."""
    ratios = diagnosis.noise_ratios
    strata = next(iter(ratios.values())).strata  # the same prompts for every weighting
    counts = f"{sum(s[1] for s in strata)} / {sum(s[2] for s in strata)}"
    cells = [f"{ratio_text(ratios[name].ratio)} ({ratio_text(ratios[name].raw_ratio)})" for name in WEIGHTINGS]
    return f"| {target.testbed} | {target.method} | {counts} | {' | '.join(cells)} |"


def compare_tables(args: argparse.Namespace) -> tuple[list[str], list[Target]]:
    """The tables of the final policies of compare_methods.py that ``--design`` etc. choose (faithfulness_testbeds),
    each diagnosed on its testbed's setting; every row is printed as soon as its policy is done."""
    records = read_records(Path(args.results))
    targets = compare_targets(
        records, Path(args.compare_dir), args.design, args.policy_seed, args.testbeds, args.methods
    )  # fmt: skip
    lines = [
        "| testbed | method | prompts with RD > 0 | SE | CD | BoT | U_c (BoT) | length (control) | BoT - SE (paired) "
        "| BoT partial for length | BoT within strata (k correct, or RD) | own weights, noisy / clean within equal k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    noise = [
        f"| testbed | policy (method) | noisy / clean prompts with RD > 0 in strata holding both | "
        f"{' | '.join(WEIGHTINGS)} |",
        "|---|---|---|" + "---|" * len(WEIGHTINGS),
    ]
    for target in targets:
        diagnosis = diagnose(str(target.policy), args, target.setting)
        lines.append(compare_row(target, diagnosis))
        print(f"{lines[-1]}  ({diagnosis.description})", flush=True)
        if diagnosis.noise_ratios:
            noise.append(noise_row(target, diagnosis))
    if len(noise) > 2:
        title = (
            "Weights of each weighting on the noisy versus the clean training prompts of equal k, per policy of a "
            "noisy testbed (each chunk of prompts weighted as one step; in brackets the unmatched ratio):"
        )
        lines += ["", title, "", *noise]
    return lines, targets


def compare_section(args: argparse.Namespace) -> list[str]:
    """The RESULTS.md section of ``--compare-dir``."""
    start = time.perf_counter()
    lines, targets = compare_tables(args)
    design = "the issue-20 design" if args.design is None else f"design_sha {', '.join(args.design)}"
    testbeds = ", ".join(dict.fromkeys(f"`{t.testbed}`" for t in targets))
    return [
        "## Faithfulness of the compared policies (uncertainty_faithfulness.py --compare-dir)", "", run_header(),
        f"The final policies of seed {args.policy_seed} of compare_methods.py ({design}; {testbeds}), each on the "
        f"prompts, reward, sampling and signals its testbed trained with (benchmarks/faithfulness_testbeds.py: the "
        f"training prompts of the noisy arms, the validation prompts elsewhere), {args.num_prompts} prompts at most x "
        f"G = {args.group_size}; Spearman rho of each signal with V on the prompts with RD > 0 [percentile-bootstrap "
        f"95% interval, {args.resamples} resamples over prompts]; BoT - SE: the difference of their correlations "
        f"with its paired interval (same resampled prompts); strata by k correct (by RD where rewards are not 0/1). "
        f"Total {(time.perf_counter() - start) / 60:.1f} min.", "", *lines,
    ]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lit-gcpo/tiny-arith", help="HF model name/path or the tiny alias")
    parser.add_argument("--testbed", default="arithmetic", choices=("arithmetic", "noisy"), help="single policy")
    parser.add_argument("--prompts", default=None, help="JSONL with prompt/answer (default: the testbed's)")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the setting's (24 single)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the setting's (1.0 single)")
    parser.add_argument("--chunk", type=int, default=None, help="prompts per step (default: the setting's; 32 single)")
    parser.add_argument("--params", default=None, help="regex of parameter names whose gradients count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="sampling, bootstrap and prompt-subset seed")
    compare = parser.add_argument_group("the final policies of compare_methods.py")
    compare.add_argument("--compare-dir", default=None, help="its --out directory: <config_sha>/<testbed>/...")
    compare.add_argument("--results", default=str(RESULTS_FILE), help="its records (testbed, method, seed, shas)")
    compare.add_argument("--design", nargs="+", default=None, help="design_sha prefixes (default: issue 20's)")
    compare.add_argument("--policy-seed", type=int, default=0, help="which seed's final policies")
    compare.add_argument("--testbeds", nargs="+", default=None, choices=list(TESTBEDS), help="default: all")
    compare.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: all")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.compare_dir is not None and args.prompts is not None:
        parser.error("--prompts with --compare-dir: each compared policy is diagnosed on its testbed's prompts")
    if args.compare_dir is None:
        for option in ("design", "testbeds", "methods"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} chooses among the compared policies: it needs --compare-dir")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.compare_dir is not None:
        section = compare_section(args)
        print("\n".join(section))
        if not args.no_write:
            write_results_section(f"{SECTION}.compare", section)
        return
    policy = resolve_policy(args.model)
    diagnosis = diagnose(policy.path, args, legacy_setting(args.testbed, args.prompts, args.num_prompts, args.seed))
    noise_lines = diagnosis.noise_lines
    if noise_lines:
        title = "Weights on the noisy versus the clean training prompts (each chunk of prompts weighted as one step):"
        noise_lines = ["", title, "", *noise_lines]
    section = SECTION if args.testbed == "arithmetic" and args.prompts is None else f"{SECTION}.{args.testbed}"
    lines = [
        f"## Uncertainty faithfulness (uncertainty_faithfulness.py, {args.testbed})", "", run_header(),
        f"Policy: {policy.description}. {diagnosis.description}. Values are Spearman rho [percentile-bootstrap 95% "
        f"interval, {args.resamples} resamples over prompts, the same resampled prompts for every signal, so the "
        f"differences' intervals are paired]; strata by {diagnosis.strata} "
        f"({'the number of correct completions' if diagnosis.strata == 'k' else 'RD, which merges k and G - k'}); "
        "the partial correlation ranks V, the signal and the mean completion length and correlates the residuals of "
        "V and the signal after the ranked length is regressed out.", "", *table(diagnosis), "", reading(diagnosis),
        *noise_lines,
    ]  # fmt: skip
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(section, lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
