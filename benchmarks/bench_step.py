"""Time per training step of the quickstart setting, split into its phases, and peak memory.

Runs ``lit-gcpo fit --config configs/quickstart.yaml`` (validation off) for a number of steps and reads
the per-step timings the module and the callbacks log: generation, reward scoring, the scoring forward
pass (old log-probs and policy embeddings), the uncertainty callback, and the optimizer steps. Reports
medians over the steps after the first (warm-up), the uncertainty callback's share of the whole step, and
the process's peak resident memory. The memory of the chunked log-prob path against a full log-softmax
for Qwen's 151,936-token vocabulary is ``bench_logprobs.py``.

    python benchmarks/bench_step.py [--steps 30] [--model lit-gcpo/tiny-arith]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import lightning as L
from _common import run_header, write_results_section

from lit_gcpo.running.cli import main as cli_main

PHASES = (
    "time/generate_s",
    "time/reward_s",
    "time/score_s",
    "time/answer_clusters_s",
    "time/uncertainty_s",
    "time/train_s",
)


class StepTimer(L.Callback):
    """Wall time between consecutive train-batch ends, each step's logged phase timings, and the whole time of
    the uncertainty callback's hook (its own ``time/uncertainty_s`` leaves out the logging it does after)."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.callback_s: list[float] = []
        self._last: float | None = None

    def wrap(self, callback: L.Callback) -> None:
        hook = callback.on_train_batch_start

        def timed(*args, **kwargs):
            start = time.perf_counter()
            hook(*args, **kwargs)
            self.callback_s.append(time.perf_counter() - start)

        callback.on_train_batch_start = timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.walls.append(now - self._last)
        self._last = now
        self.phases.append({k: float(trainer.callback_metrics[k]) for k in PHASES if k in trainer.callback_metrics})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="lit-gcpo/tiny-arith")
    args = parser.parse_args()
    timer = StepTimer()
    cli = cli_main(
        [
            "--config",
            "configs/quickstart.yaml",
            "--model.model",
            args.model,
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",  # a fresh directory: without a logger a run claims this one
            tempfile.mkdtemp(prefix="bench_step_"),
            "--model.export_dir",
            "null",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(timer)
    for callback in cli.trainer.callbacks:
        if type(callback).__name__ == "UncertaintyCallback":
            timer.wrap(callback)
    cli.trainer.fit(cli.model, cli.datamodule)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = timer.phases[1:]  # the first step includes warm-up (grading process start, allocations)
    medians = {k: statistics.median(s[k] for s in steps if k in s) for k in PHASES}
    wall = statistics.median(timer.walls[1:]) if len(timer.walls) > 1 else float("nan")
    callback_s = statistics.median(timer.callback_s[1:])
    data = cli.datamodule
    lines = [
        "## Training step of the quickstart (`bench_step.py`)",
        "",
        run_header(),
        f"Model `{args.model}`, B = {data.batch_size} prompts x G = {data.group_size} completions, "
        f"{data.sampling.max_new_tokens} new tokens at most; median over steps 2-{args.steps}.",
        "",
        "| phase | median s/step | share of the step |",
        "| --- | ---: | ---: |",
    ]
    for key, value in medians.items():
        lines.append(f"| {key.removeprefix('time/').removesuffix('_s')} | {value:.4f} | {value / wall:.1%} |")
    lines += [
        f"| whole step (wall, incl. logging) | {wall:.4f} | 100% |",
        "",
        "`answer_clusters` runs in a thread during `score` (the policy's no-grad forward pass), so it is not"
        " added to the step; `uncertainty` is the callback's own timer (signals and weights).",
        f"The uncertainty callback's whole hook (signals, weights and its logging; answer clusters and policy"
        f" embeddings come with the batch) takes {callback_s:.4f} s, {callback_s / wall:.1%} of a step.",
        f"Peak resident memory of the process: {peak_mb:.0f} MB.",
    ]
    write_results_section("bench_step", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
