"""The quickstart's claim, measured for several seeds: greedy validation accuracy gained, wall time, padding.

Runs the quickstart (``lit-gcpo fit --config configs/quickstart.yaml``, what ``./scripts/quickstart.sh``
runs) once per seed, one after the other, each in its own process under a time bound, with its TensorBoard
logs in ``--out/seed{S}``. From each run's scalars it reads the validation accuracy at every validation (the
step-0 baseline included), ``completion/truncated_frac`` and the step count, and writes one table row per
seed to ``benchmarks/RESULTS.md`` (section ``quickstart_seeds``): the run's wall time (the whole process,
start-up and validations included), baseline, final and best accuracy, the gain in points and the share of
truncated completions over the last 20 steps. The README's quickstart section quotes this table.

    python benchmarks/bench_quickstart.py [--seeds 0 1 2] [--out runs/bench_quickstart] [--timeout 600]
                                          [--collect-only] [--no-write] [-- --trainer.max_steps 100 ...]

Arguments after ``--`` go to ``lit-gcpo fit`` (a table made with them says so). ``--collect-only`` re-reads
the runs of ``--out`` without training. The runs use every core (``--threads``, default 2): run nothing else
meanwhile, the load average at the end is in the header.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import run_header, validation_trajectory, write_results_section

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/quickstart.yaml"
SECTION = "quickstart_seeds"
TARGET_POINTS = 20.0
TARGET_WALL_S = 180.0
TAIL_STEPS = 20
"""Steps at the end of a run over which ``completion/truncated_frac`` is averaged."""


@dataclass(frozen=True)
class RunSummary:
    """What one quickstart run's TensorBoard scalars say.

    Attributes:
        validations: ``(training steps done, val/accuracy)`` of every validation, the step-0 baseline first.
        truncated_tail: mean ``completion/truncated_frac`` over the last ``TAIL_STEPS`` training steps.
        truncated_max: its largest value over the run.
        steps: training steps logged.
        step_s: median wall time between consecutive training steps' logs (validations excluded by the median).
    """

    validations: list[tuple[int, float]]
    truncated_tail: float
    truncated_max: float
    steps: int
    step_s: float

    @property
    def baseline(self) -> float:
        return self.validations[0][1]

    @property
    def final(self) -> float:
        return self.validations[-1][1]

    @property
    def best(self) -> float:
        return max(value for _, value in self.validations)

    @property
    def gain_points(self) -> float:
        return 100.0 * (self.final - self.baseline)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """``tag -> [(step, wall_time, value)]`` of every scalar in the event files of ``log_dir``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: sorted((event.step, event.wall_time, event.value) for event in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["scalars"]
    }


def summarise(log_dir: Path) -> RunSummary:
    """The :class:`RunSummary` of the run logged in ``log_dir``; a clear error when it lacks what is needed."""
    scalars = read_scalars(log_dir)
    # Lightning logs the validation run after training step k at TensorBoard step k - 1 (the step-0 baseline at
    # 0): report the number of training steps done, as the run's own summary line does.
    validations = [(step + 1 if step else 0, value) for step, _, value in scalars.get("val/accuracy", [])]
    truncated = scalars.get("completion/truncated_frac", [])
    if not validations or validations[0][0] != 0:
        raise ValueError(f"{log_dir}: no val/accuracy at step 0 (the baseline); was num_sanity_val_steps -1?")
    if len(validations) < 2:
        raise ValueError(f"{log_dir}: val/accuracy only at step 0: the run validated nothing after training")
    if not truncated:
        raise ValueError(f"{log_dir}: no completion/truncated_frac: the run logged no training step")
    walls = [wall for _, wall, _ in truncated]
    gaps = [later - earlier for earlier, later in itertools.pairwise(walls)]
    tail = [value for _, _, value in truncated[-TAIL_STEPS:]]
    return RunSummary(
        validations=validations,
        truncated_tail=sum(tail) / len(tail),
        truncated_max=max(value for _, _, value in truncated),
        steps=len(truncated),
        step_s=statistics.median(gaps) if gaps else float("nan"),
    )


def latest_version(seed_dir: Path) -> Path:
    """The newest ``version_N`` log directory under ``seed_dir`` (the logger's ``name`` level included)."""
    versions = sorted(seed_dir.glob("*/version_*"), key=lambda path: int(path.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard run (*/version_N) under {seed_dir}")
    return versions[-1]


def run_seed(seed: int, seed_dir: Path, threads: int, timeout: float, extra: list[str]) -> float:
    """One quickstart run in a fresh process; returns its wall time (also kept in ``seed_dir/wall.json``)."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", CONFIG, "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(seed_dir), "--trainer.logger.init_args.save_dir", str(seed_dir),
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(seed_dir / "fit.log", "w") as log_file:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (seed_dir / "fit.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"seed {seed}: {' '.join(command)} failed ({done.returncode}):\n" + "\n".join(tail))
    (seed_dir / "wall.json").write_text(json.dumps({"wall_s": wall, "extra": extra}))
    return wall


def table(rows: list[tuple[int, float | None, RunSummary]]) -> list[str]:
    """Markdown lines: one row per ``(seed, wall_s, summary)``, then the worst seed against the targets."""
    lines = [
        "| seed | wall (s) | steps | s/step | val accuracy after N steps (N: acc) | baseline | final | best "
        "| gain (points) | truncated, last 20 steps | truncated, max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, wall, run in rows:
        trajectory = validation_trajectory(run.validations)
        lines.append(
            f"| {seed} | {'-' if wall is None else f'{wall:.0f}'} | {run.steps} | {run.step_s:.2f} | {trajectory} "
            f"| {run.baseline:.3f} | {run.final:.3f} | {run.best:.3f} | {run.gain_points:+.1f} "
            f"| {run.truncated_tail:.3f} | {run.truncated_max:.3f} |"
        )
    worst = min(rows, key=lambda row: row[2].gain_points)
    walls = [wall for _, wall, _ in rows if wall is not None]
    met = worst[2].gain_points >= TARGET_POINTS and bool(walls) and max(walls) <= TARGET_WALL_S
    lines += [
        "",
        f"Worst seed: {worst[0]}, {worst[2].gain_points:+.1f} points; longest run "
        + (f"{max(walls):.0f} s" if walls else "not timed")
        + f". Target (>= {TARGET_POINTS:.0f} points within {TARGET_WALL_S:.0f} s for every seed): "
        + ("met." if met else "NOT met."),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_quickstart")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take before it is killed")
    parser.add_argument("--collect-only", action="store_true", help="read the runs in --out, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("extra", nargs="*", help="after --: options for `lit-gcpo fit`")
    args = parser.parse_args()

    rows: list[tuple[int, float | None, RunSummary]] = []
    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        if args.collect_only:
            saved = seed_dir / "wall.json"
            wall = json.loads(saved.read_text())["wall_s"] if saved.is_file() else None
        else:
            wall = run_seed(seed, seed_dir, args.threads, args.timeout, args.extra)
        rows.append((seed, wall, summarise(latest_version(seed_dir))))
        print(f"seed {seed}: " + table(rows[-1:])[2], flush=True)

    lines = [
        "## Quickstart over seeds (`benchmarks/bench_quickstart.py`)",
        "",
        run_header(threads=args.threads),
        "",
        f"`{CONFIG}` as committed"
        + (f", with `{' '.join(args.extra)}`" if args.extra else "")
        + "; one run per seed, sequentially. Greedy validation accuracy (`val/accuracy`) at step 0 (the "
        "starting policy) and at every validation; `completion/truncated_frac` is the share of sampled training "
        "completions that hit `max_new_tokens`. Wall time: the whole `lit-gcpo fit` process.",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(SECTION, lines)


if __name__ == "__main__":
    main()
