"""One timed training run of ``bench_vs_trl.py``, as its own process: TRL's ``GRPOTrainer`` (run with the TRL
venv's python) or ``lit-gcpo fit`` (the project's), on the work of ``vs_trl_work``.

    python vs_trl_runner.py {trl,lit} WORK_DIR BETA STEPS MAX_NEW_TOKENS OUT.json [ENGINE] [--min-tokens N]

(``ENGINE``: lit-gcpo's ``data.engine``, ``hf`` by default. ``--min-tokens``: no completion ends before it has N
tokens, lit-gcpo's ``data.sampling.min_tokens`` and TRL's ``min_new_tokens``; N = MAX_NEW_TOKENS is
``bench_vs_trl.py``'s same-length control. 0 by default.)

Writes ``OUT.json``: the wall time of every optimizer step (between consecutive step ends, so logging is in) and
the process's CPU time over the same interval (all its threads: ``time.process_time``),
each step's split, completion tokens per step, the process's peak RSS (``ru_maxrss``) and that of its child
processes still alive at the end (``VmHWM``: lit-gcpo's reward process), torch's thread count (left at its
default on both sides) and the ``OMP_WAIT_POLICY`` the process ran under (after the framework's imports: lit-gcpo's
CLI decides it when the environment does not).

Splits. lit-gcpo: its logged ``time/generate_s``, ``time/reward_s``, ``time/score_s`` (the no-grad scoring
pass: old log-probs, embeddings, reference log-probs) and ``time/train_s`` (forward, backward, optimizer).
TRL: its own profiling timers (``trl.extras.profiling``), which report only to wandb/mlflow/trackio, are
read here by replacing ``ProfilingContext._log_metrics`` with a recorder: ``transformers.generate``,
``_calculate_rewards``, ``_prepare_inputs`` (the whole rollout: generation, rewards, tokenising, the
reference pass), ``compute_loss`` (the training forward and loss); backward and the optimizer step are what
remains of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_trl_work import GROUP_SIZE, PROMPTS_PER_STEP, WorkFiles, lit_args, sum_reward, trl_config_kwargs


def children_peak_mib() -> float:
    """Sum of the peak RSS (``VmHWM``) of this process's live children (Linux ``/proc``; 0 elsewhere)."""
    total_kib = 0
    me = str(os.getpid())
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
            total_kib += int(fields["VmHWM"].split()[0])
    return total_kib / 1024


def finish(
    out: Path,
    framework: str,
    walls: list[float],
    cpus: list[float],
    phases: list[dict[str, float]],
    tokens: list[float],
    optimizer_steps: int,
) -> None:
    import torch

    record = {
        "framework": framework,
        "optimizer_steps": optimizer_steps,
        "walls": walls,
        "cpus": cpus,
        "phases": phases,
        "completion_tokens": tokens,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mib": children_peak_mib(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    out.write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------ TRL
def run_trl(
    files: WorkFiles, beta: float, steps: int, max_new_tokens: int, out: Path, engine: str = "hf", min_tokens: int = 0
) -> None:
    if engine != "hf":
        raise ValueError(f"TRL generates with model.generate; engine {engine!r} is lit-gcpo's only")
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    current: dict[str, float] = defaultdict(float)

    def record(self: Any, duration: float) -> None:  # replaces the wandb/mlflow/trackio reporting
        current[self.name.removeprefix("GRPOTrainer.")] += duration

    profiling.ProfilingContext._log_metrics = record
    walls: list[float] = []
    cpus: list[float] = []
    phases: list[dict[str, float]] = []
    tokens: list[float] = []

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.last_cpu = 0.0
            self.begin = self.stepped = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stepped = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            if self.last is not None:
                walls.append(now - self.last)
                cpus.append(cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu
            # training_step (rollout, forward, backward) plus clipping and the optimizer step
            phases.append({**current, "until_optimizer_step": self.stepped - self.begin})
            current.clear()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * PROMPTS_PER_STEP * GROUP_SIZE)

    dataset = datasets.load_dataset("json", data_files=str(files.prompts), split="train")
    config = GRPOConfig(**trl_config_kwargs(beta, steps, out.parent / f"{out.stem}-trl", max_new_tokens, min_tokens))
    trainer = GRPOTrainer(
        model=str(files.model),
        reward_funcs=[sum_reward],
        args=config,
        train_dataset=dataset,
        callbacks=[StepClock()],
    )
    trainer.train()
    finish(out, "trl", walls, cpus, phases, tokens, trainer.state.global_step)


# ------------------------------------------------------------------------------------------- lit-gcpo
LIT_PHASES = ("time/generate_s", "time/reward_s", "time/score_s", "time/train_s", "time/answer_clusters_s")


def run_lit(
    files: WorkFiles, beta: float, steps: int, max_new_tokens: int, out: Path, engine: str = "hf", min_tokens: int = 0
) -> None:
    # The CLI first, as the `lit-gcpo` command imports it: it decides OMP_WAIT_POLICY before torch is imported,
    # and OpenMP reads the variable once (importing lightning first left OpenMP's default in force whatever the
    # CLI then set: 6x the CPU per step under PASSIVE on a busy machine).
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before lit_gcpo.running.cli: its OMP_WAIT_POLICY would not take effect")
    from lit_gcpo.running.cli import main as cli_main  # isort: skip

    import lightning as L

    walls: list[float] = []
    cpus: list[float] = []
    phases: list[dict[str, float]] = []
    tokens: list[float] = []

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.last_cpu = 0.0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            if self.last is not None:
                walls.append(now - self.last)
                cpus.append(cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu
            metrics = trainer.callback_metrics
            phases.append(
                {k.removeprefix("time/").removesuffix("_s"): float(metrics[k]) for k in LIT_PHASES if k in metrics}
            )
            tokens.append(float(batch.completion_mask.sum()))

    args = lit_args(files, beta, steps, out.parent / f"{out.stem}-lit", max_new_tokens, engine, min_tokens)
    cli = cli_main(args[1:], run=False)
    cli.trainer.callbacks.append(StepClock())
    cli.trainer.fit(cli.model, cli.datamodule)
    finish(out, "lit", walls, cpus, phases, tokens, cli.trainer.global_step)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=["trl", "lit"])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("beta", type=float)
    parser.add_argument("steps", type=int)
    parser.add_argument("max_new_tokens", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("engine", nargs="?", default="hf")
    parser.add_argument("--min-tokens", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    run = {"trl": run_trl, "lit": run_lit}[args.framework]
    work = WorkFiles(args.work_dir)
    run(work, args.beta, args.steps, args.max_new_tokens, args.out, args.engine, args.min_tokens)


if __name__ == "__main__":
    main(sys.argv[1:])
