"""The tables of ``bench_vs_trl.py``: per-run medians, their summary over repeats, and the RESULTS.md section."""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from _common import run_header
from vs_trl_env import ENVIRONMENTS, LOADED_SHARE, QUIET_SHARE
from vs_trl_work import GROUP_SIZE, PROMPTS_PER_STEP, SIZES

ROOT = Path(__file__).resolve().parent.parent


def split_of(record: dict[str, Any], warmup_steps: int) -> dict[str, float]:
    """Per-phase medians (s) over the steps after the first ``warmup_steps``, in common names; ``rest`` is the
    wall time not in a phase (logging, the data loader, callbacks); ``cpu`` the process's CPU time per step."""
    walls = record["walls"]  # walls[k]: step k + 2 (1-based), between the ends of steps k + 1 and k + 2
    cpus = record.get("cpus") or [float("nan")] * len(walls)
    rows: list[dict[str, float]] = []
    for step in range(warmup_steps + 1, len(walls) + 2):
        phases, wall = record["phases"][step - 1], walls[step - 2]
        if record["framework"] == "lit":
            row = {k: phases.get(k, 0.0) for k in ("generate", "reward", "score", "train")}
        else:
            rollout = phases.get("_prepare_inputs", 0.0)
            row = {
                "generate": phases.get("transformers.generate", 0.0),
                "reward": phases.get("_calculate_rewards", 0.0),
                "train": phases["until_optimizer_step"] - rollout,
            }
            row["score"] = rollout - row["generate"] - row["reward"]
        row["rest"] = wall - sum(row.values())
        row["step"] = wall
        row["cpu"] = cpus[step - 2]
        rows.append(row)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def summarise(records: list[dict], sizes: list[str], environments: list[str], betas: list[float]) -> dict:
    """``results[size][environment][beta][framework]``: medians over repeats of the per-run medians and peak RSS,
    mean completion tokens per step, the largest foreign share, the load averages and the wait policy seen."""
    results: dict = {}
    for size in sizes:
        for environment in environments:
            for beta in betas:
                for framework in ("trl", "lit"):
                    runs = [
                        r
                        for r in records
                        if (r["size"], r["environment"], r["beta"], r["framework"])
                        == (size, environment, beta, framework)
                    ]
                    splits = [split_of(r, SIZES[size].warmup_steps) for r in runs]
                    summary = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
                    summary.update(
                        rss=statistics.median(r["peak_rss_mib"] for r in runs),
                        rss_children=statistics.median(r["children_peak_rss_mib"] for r in runs),
                        tokens=statistics.fmean(t for r in runs for t in r["completion_tokens"]),
                        threads=runs[0]["threads"],
                        policy=runs[0].get("omp_wait_policy", "?"),
                        foreign=max(r["foreign_share"] for r in runs),
                        loads=[(r["load_before"], r["load_after"]) for r in runs],
                        runs=[s["step"] for s in splits],
                    )
                    results.setdefault(size, {}).setdefault(environment, {}).setdefault(beta, {})[framework] = summary
    return results


def unequal_lengths(records: list[dict], environments: dict[str, Any]) -> list[str]:
    """Why the same-length rows may not be written, one message per run (empty: they may): in an environment with
    ``same_length`` every step of every run must hold ``PROMPTS_PER_STEP x GROUP_SIZE x max_new_tokens`` completion
    tokens, TRL's and lit-gcpo's alike."""
    messages = []
    for run in records:
        if not environments[run["environment"]].same_length:
            continue
        size = SIZES[run["size"]]
        expected = PROMPTS_PER_STEP * GROUP_SIZE * size.max_new_tokens
        seen = sorted(set(run["completion_tokens"]))
        if seen != [expected]:
            name = f"{run['environment']} {run['size']} beta {run['beta']:g} {run['framework']} repeat {run['repeat']}"
            messages.append(
                f"{name}: completion tokens per step {', '.join(f'{t:g}' for t in seen)}, not "
                f"{PROMPTS_PER_STEP} x {GROUP_SIZE} x {size.max_new_tokens} = {expected} at every step"
            )
    return messages


PHASE_ROWS = (
    ("generate", "generation"),
    ("reward", "reward"),
    ("score", "scoring pass (lit) / rest of the rollout incl. reference pass (TRL)"),
    ("train", "training: forward, loss, backward, clip, optimizer"),
    ("rest", "rest: logging, data, callbacks"),
    ("step", "whole step (median)"),
)


def venv_name(python: Path) -> str:
    """The venv of ``python`` as the report names it: relative to the repository when inside it."""
    venv = Path(os.path.abspath(python)).parent.parent
    return str(venv.relative_to(ROOT)) if venv.is_relative_to(ROOT) else str(venv)


def _size_table(size: str, results: dict, args: argparse.Namespace) -> list[str]:
    work = SIZES[size]
    lines = [
        f"### {size}: {args.parameters[size]:,}-parameter random Llama, at most {work.max_new_tokens} new tokens "
        f"({args.repeats[size]} repeats x {args.steps[size]} steps; per run the median over steps "
        f"{work.warmup_steps + 1}-{args.steps[size]})",
        "",
        "| environment | beta | TRL step (s) | lit-gcpo step (s) | lit / TRL | CPU s/step TRL, lit | peak RSS TRL, lit "
        "(MiB) | lit / TRL | tokens/step TRL, lit | OMP_WAIT_POLICY TRL, lit | foreign CPU share (max) | load "
        "before -> after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for environment, betas in results[size].items():
        for beta, sides in betas.items():
            trl, lit = sides["trl"], sides["lit"]
            loads = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in trl["loads"] + lit["loads"])
            ratio = lit["step"] / trl["step"]
            lines.append(
                f"| {environment} | {beta:g} | {trl['step']:.3f} | {lit['step']:.3f} | **{ratio:.2f}x**"
                f" | {trl['cpu']:.3f}, {lit['cpu']:.3f} | {trl['rss']:.0f}, {lit['rss']:.0f} "
                f"(+{lit['rss_children']:.0f} reward process) | {lit['rss'] / trl['rss']:.2f}x "
                f"| {trl['tokens']:.0f}, {lit['tokens']:.0f} | {trl['policy']}, {lit['policy']} "
                f"| {max(trl['foreign'], lit['foreign']):.2f} | {loads} |"
            )
    lines += ["", "Split of the step (median s over steps and repeats), beta 0 or the first beta:", ""]
    beta = next(iter(next(iter(results[size].values()))))
    header = " | ".join(f"TRL {e} | lit {e}" for e in results[size])
    lines += [f"| phase | {header} |", "| --- |" + " ---: |" * (2 * len(results[size]))]
    for key, label in PHASE_ROWS:
        cells = " | ".join(f"{b[beta]['trl'][key]:.3f} | {b[beta]['lit'][key]:.3f}" for b in results[size].values())
        lines.append(f"| {label} | {cells} |")
    lines.append("")
    return lines


def report(
    results: dict, records: list[dict], args: argparse.Namespace, versions: dict, refusals: list[str]
) -> list[str]:
    """The RESULTS.md section: the environments, one table per size (as-a-user first), the splits."""
    threads = records[0]["threads"]
    lines = ["## lit-gcpo against TRL's GRPOTrainer on the same work (`bench_vs_trl.py`)", ""]
    if refusals:
        lines += ["**Measured on a busy machine: not the quiet comparison.** " + "; ".join(refusals), ""]
    lines += [
        run_header(threads=threads),
        f"TRL {versions['trl']}, transformers {versions['transformers']} (both venvs), torch {versions['torch']}; "
        f"character tokenizer, {PROMPTS_PER_STEP} prompts x G = {GROUP_SIZE} completions per optimizer step, Dr. "
        "GRPO, fp32, one optimizer step per rollout, TensorBoard scalars every step on both sides; lit-gcpo ran with "
        f"`{venv_name(args.lit_python)}` (settings: the script's docstring). Runs interleaved (per size and repeat "
        "the environments in turn, TRL and lit-gcpo alternating first); the table gives the median over repeats of "
        "the per-run median steps.",
        "",
        "Environments: " + "; ".join(f"`{e}`: {ENVIRONMENTS[e].description}" for e in args.environments) + ". "
        f"Foreign CPU share: the machine's busy CPU time during the run (`/proc/stat`) minus the run's own (its "
        f"rusage), over wall x cores; a quiet run has at most {QUIET_SHARE}, a loaded one at least {LOADED_SHARE}.",
        "",
    ]
    for size in args.sizes:
        lines += _size_table(size, results, args)
    lines += [
        "TRL's split comes from its own profiling timers (`transformers.generate`, `_calculate_rewards`, "
        "`_prepare_inputs`) and the trainer's step/optimizer callbacks; lit-gcpo's from its `time/*` scalars. "
        "Peak RSS is `ru_maxrss` of the training process; lit-gcpo runs a user's reward function in a child "
        "process, whose peak is given in parentheses (TRL calls it in process). CPU s/step: the training "
        "process's CPU time (all threads) per step, spinning included.",
    ]
    return lines
