"""Dynamic sampling (issue 22 item 1) on the quickstart: what it costs per step and what it does to accuracy.

For each seed, the quickstart (``configs/quickstart.yaml``) twice, paired (same seed: the same prompt order and
sampler seeds): as committed, and with ``--data.dynamic_sampling.max_rounds R``. From each run's TensorBoard
scalars: the greedy validation accuracy at every validation (the step-0 baseline included), the median wall time
of a training step, and per step the rollout rounds, prompts sampled and groups trained (dynamic sampling) or the
share of groups without reward spread (``train/zero_spread_frac``, off). Writes ``benchmarks/RESULTS.md``, section
``dynamic_sampling``.

    python benchmarks/bench_dynamic_sampling.py [--seeds 0] [--max-rounds 8] [--steps 100] [--threads 2]
                                                [--out runs/bench_dynamic_sampling] [--collect-only] [--no-write]

Runs are one after the other, each in its own process (``bench_quickstart.run_seed``); the load average at the end
is in the header: on a shared machine the times are indicative, the ratio of the pair more than either.
"""

from __future__ import annotations

import argparse
import json
import statistics

from _common import add_paired_arguments, paired_by_seed, run_header, validation_trajectory, write_results_section
from bench_quickstart import REPO, latest_version, read_scalars, run_seed, summarise

SECTION = "dynamic_sampling"


def _mean(scalars: dict, tag: str) -> float:
    values = [value for _, _, value in scalars.get(tag, [])]
    return statistics.fmean(values) if values else float("nan")


def run_arm(seed: int, arm: str, args: argparse.Namespace) -> dict:
    """One run (``arm``: ``off`` or ``on``), trained unless ``--collect-only``; its summary as a dict."""
    run_dir = args.out / f"seed{seed}-{arm}"
    extra = ["--trainer.max_steps", str(args.steps)]
    if arm == "on":
        extra += ["--data.dynamic_sampling.max_rounds", str(args.max_rounds)]
    if not args.collect_only:
        run_seed(seed, run_dir, args.threads, args.timeout, extra)
    log_dir = latest_version(run_dir)
    summary, scalars = summarise(log_dir), read_scalars(log_dir)
    wall = json.loads((run_dir / "wall.json").read_text())["wall_s"]
    return {
        "seed": seed,
        "arm": arm,
        "wall_s": wall,
        "step_s": summary.step_s,
        "steps": summary.steps,
        "validations": summary.validations,
        "rounds": _mean(scalars, "rollout/rounds"),
        "prompts": _mean(scalars, "rollout/prompts_sampled"),
        "trained": _mean(scalars, "rollout/groups_trained"),
        "missing": sum(value for _, _, value in scalars.get("rollout/groups_missing", [])),
        "zero_spread": _mean(scalars, "train/zero_spread_frac"),
    }


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| seed | dynamic sampling | wall (s) | s/step | rounds/step | prompts sampled/step | groups trained/step "
        "| groups missing (sum) | zero-spread share | val accuracy after N steps (N: acc) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        trajectory = validation_trajectory(run["validations"])
        on = run["arm"] == "on"
        fill = f"{run['rounds']:.2f} | {run['prompts']:.1f} | {run['trained']:.1f} | {run['missing']:.0f}"
        lines.append(
            f"| {run['seed']} | {'max_rounds ' + str(run.get('max_rounds', '')) if on else 'off'} "
            f"| {run['wall_s']:.0f} | {run['step_s']:.2f} | {fill if on else '- | 64 | 64 | -'} "
            f"| {run['zero_spread']:.3f} | {trajectory} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_paired_arguments(parser, REPO / "runs" / "bench_dynamic_sampling", seeds=[0])
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        for arm in ("off", "on"):
            runs.append({**run_arm(seed, arm, args), "max_rounds": args.max_rounds})
            print(table(runs[-1:])[2], flush=True)
    pairs = [(off, on) for off, on in zip(runs[::2], runs[1::2], strict=True)]
    final = [on["validations"][-1][1] - off["validations"][-1][1] for off, on in pairs]
    time_ratio = [on["step_s"] / off["step_s"] for off, on in pairs]
    lines = [
        "## Dynamic sampling on the quickstart (`benchmarks/bench_dynamic_sampling.py`)",
        "",
        run_header(threads=args.threads),
        "",
        f"`configs/quickstart.yaml` for {args.steps} steps (its cosine schedule ends there), per seed once as "
        f"committed and once with `--data.dynamic_sampling.max_rounds {args.max_rounds}`, sequentially. Per step "
        "(means over the logged steps): rollout rounds, prompts sampled and groups trained (64 wanted); zero-spread "
        "share: `train/zero_spread_frac` (the groups the loss sees without reward spread, 0 by construction with "
        "dynamic sampling). Greedy validation accuracy on 256 problems (standard error about 3 points). The arms "
        "are compared at equal optimizer steps: dynamic sampling generates and scores about twice the prompts, "
        "which the step time ratio pays for.",
        "",
        *table(runs),
        "",
        paired_by_seed("dynamic sampling minus off", final, time_ratio),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(SECTION, lines)


if __name__ == "__main__":
    main()
