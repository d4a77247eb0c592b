"""GRPO vs SEED-GRPO vs GCPO on the synthetic arithmetic task: same budget, several seeds, real CLI runs.

Every run is ``lit-gcpo fit`` (``python -m lit_gcpo.cli``, a fresh process each) on the quickstart config,
read at run time, with only these overrides:

- the ``UncertaintyCallback``'s ``method``; ``family``/``alpha`` are kept for ``gcpo`` (the config's values)
  and removed for the others, so that ``seed_grpo`` uses its own defaults (inverse, alpha 0.0417) and
  ``grpo`` has w = 1. Everything else (advantage mode, learning rate, batch, G, ...) is identical, so the
  methods differ only in the advantage weights;
- the seed: ``seed_everything`` and ``data.seed`` (prompt order and sampling). The train and validation
  prompts (the sources' own seeds) stay those of the config, so every run is validated on the same prompts;
- ``trainer.max_steps`` (``--steps``), ``trainer.val_check_interval`` (a divisor of the steps, so that the
  last step is validated), log and checkpoint directories under ``--out``, ``model.export_dir: null``;
- ``model.model`` only while the tiny policy's asset does not exist (a stand-in, see ``_common.py``).

The untrained policy's validation accuracy (step 0) is measured once with ``lit-gcpo validate`` (Lightning's
sanity check does not log). Curves come from the TensorBoard event files (``val/accuracy``; the validation
after optimizer step k is logged at step k - 1 and plotted at k).

    python benchmarks/compare_methods.py --steps 10 --seeds 0          # smoke test
    python benchmarks/compare_methods.py                               # 3 methods x 3 seeds, config's steps
    python benchmarks/compare_methods.py --collect-only                # re-read finished runs, redo table/plot
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIGURES, resolve_policy, run_header, write_results_section

REPO = Path(__file__).resolve().parent.parent
SECTION = "compare_methods"
CALLBACK = "lit_gcpo.callbacks.UncertaintyCallback"
METRIC = "val/accuracy"
METHODS = ("grpo", "seed_grpo", "gcpo")


def val_interval(steps: int, wanted: int) -> int:
    """The largest divisor of ``steps`` not above ``wanted``: validation then falls on the last step."""
    wanted = max(1, min(wanted, steps))
    return next(d for d in range(wanted, 0, -1) if steps % d == 0)


def run_config(
    base: dict[str, Any], method: str, seed: int, steps: int, out: Path, model_path: str | None
) -> dict[str, Any]:
    """The base config with the benchmark's overrides (module docstring) for one (method, seed) run."""
    config = copy.deepcopy(base)
    trainer = config.setdefault("trainer", {})
    config["seed_everything"] = seed
    config.setdefault("data", {})["seed"] = seed
    trainer["max_steps"] = steps
    trainer["val_check_interval"] = val_interval(steps, int(trainer.get("val_check_interval") or steps))
    trainer["check_val_every_n_epoch"] = None
    trainer["default_root_dir"] = str(out / method / f"seed{seed}")
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": method, "version": f"seed{seed}"},
    }
    callbacks = [c for c in trainer.get("callbacks") or [] if c.get("class_path") != CALLBACK]
    original = next((c for c in trainer.get("callbacks") or [] if c.get("class_path") == CALLBACK), None)
    init_args = dict(original["init_args"]) if original else {}
    init_args["method"] = method
    if method != "gcpo":
        init_args.pop("family", None)
        init_args.pop("alpha", None)
    trainer["callbacks"] = [{"class_path": CALLBACK, "init_args": init_args}, *callbacks]
    model = config.setdefault("model", {})
    model["export_dir"] = None
    if model_path is not None:
        model["model"] = model_path
    return config


def launch(subcommand: str, config: dict[str, Any], directory: Path, threads: int, timeout: float) -> float:
    """Run ``lit-gcpo <subcommand> --config`` in a fresh process; returns its wall time, raises on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{subcommand}_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lit_gcpo.cli", subcommand, "--config", str(config_path)]
    start = time.perf_counter()
    with open(directory / f"{subcommand}.log", "w") as log_file:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        tail = (directory / f"{subcommand}.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def read_scalars(log_dir: Path, tag: str = METRIC) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` in the TensorBoard event files under ``log_dir``, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return []
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return sorted((event.step, event.value) for event in accumulator.Scalars(tag))


def baseline_accuracy(base: dict[str, Any], out: Path, model_path: str | None, args: argparse.Namespace) -> float:
    """Validation accuracy of the starting policy (``lit-gcpo validate``), measured once per ``--out``."""
    config = run_config(base, "grpo", 0, 1, out, model_path)
    config["trainer"]["logger"]["init_args"].update(name="baseline", version="validate")
    config["trainer"]["callbacks"] = []
    log_dir = out / "baseline" / "validate"
    if not args.collect_only and not read_scalars(log_dir):
        launch("validate", config, out / "baseline", args.threads, args.timeout)
    values = read_scalars(log_dir)
    if not values:
        raise RuntimeError(f"no {METRIC} in {log_dir}: did `lit-gcpo validate` run?")
    return values[-1][1]


def summarise(finals: list[float]) -> tuple[float, float, float, float]:
    """mean, sample std (0 for one run), min, max."""
    array = np.asarray(finals, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), std, float(array.min()), float(array.max())


def plot(curves: dict[str, list[list[tuple[int, float]]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for method, runs in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
        values = np.array([[dict(run)[s] for s in steps] for run in runs])  # [seeds, steps]
        mean, std = values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
        axis.plot(steps, mean, marker="o", label=f"{method} (n={len(runs)})")
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("greedy validation accuracy")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    parser.add_argument("--out", default=str(REPO / "runs" / "compare_methods"))
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run (1: shared cores)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--collect-only", action="store_true", help="re-read finished runs, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)

    base = yaml.safe_load(Path(args.config).read_text())
    steps = args.steps or int(base["trainer"]["max_steps"])
    out = Path(args.out).resolve()
    model_name = base.get("model", {}).get("model", "lit-gcpo/tiny-arith")
    policy = resolve_policy(model_name)
    model_path = policy.path if policy.stand_in else None

    interval = val_interval(steps, int(base["trainer"].get("val_check_interval") or steps))
    start = time.perf_counter()
    baseline = baseline_accuracy(base, out, model_path, args)
    curves: dict[str, list[list[tuple[int, float]]]] = {m: [] for m in args.methods}
    finals: dict[str, list[float]] = {m: [] for m in args.methods}
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    weights: dict[str, list[float]] = {m: [] for m in args.methods}  # per-step mean advantage weight
    lowest: dict[str, list[float]] = {m: [] for m in args.methods}  # per-step min advantage weight
    for seed in args.seeds:  # seed-major, so that an interrupted run still has every method at some seed
        for method in args.methods:
            log_dir = out / method / f"seed{seed}"
            if not args.collect_only:
                config = run_config(base, method, seed, steps, out, model_path)
                seconds[method].append(launch("fit", config, log_dir, args.threads, args.timeout))
                print(f"{method} seed {seed}: {seconds[method][-1]:.0f} s", flush=True)
            elif (log_dir / "fit.log").is_file() and (log_dir / "fit_config.yaml").is_file():
                # the config is written right before the launch and the log last touched at its end
                began = (log_dir / "fit_config.yaml").stat().st_mtime
                seconds[method].append((log_dir / "fit.log").stat().st_mtime - began)
            # Lightning logs the validation that follows optimizer step k at logger step k - 1; an entry at
            # another step (the sanity check of the starting policy, when it is logged) is the baseline's.
            values = [(s + 1, v) for s, v in read_scalars(log_dir) if s + 1 <= steps and (s + 1) % interval == 0]
            if not values or values[-1][0] != steps:
                print(f"{method} seed {seed}: no {METRIC} at step {steps} in {log_dir}; left out", flush=True)
                continue
            curves[method].append([(0, baseline), *values])
            finals[method].append(values[-1][1])
            weights[method] += [v for _, v in read_scalars(log_dir, "uncertainty/weight_mean")]
            lowest[method] += [v for _, v in read_scalars(log_dir, "uncertainty/weight_min")]

    done = {m: f for m, f in finals.items() if f}
    # seeds are shared across methods (same prompt order and sampler seeds): compare them seed by seed
    paired_seeds = all(len(f) == len(args.seeds) for f in done.values())
    table = [
        "| method | runs | final val accuracy, mean ± std | min - max | per seed | advantage weight: mean (min) "
        "| wall time per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, values in done.items():
        mean, std, low, high = summarise(values)
        per_run = f"{np.mean(seconds[method]):.0f} s" if seconds[method] else "n/a"
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        weight = f"{np.mean(weights[method]):.4f} ({min(lowest[method]):.4f})" if weights[method] else "n/a"
        table.append(
            f"| {method} | {len(values)} | {mean:.3f} ± {std:.3f} | {low:.3f} - {high:.3f} | {per_seed} | {weight} "
            f"| {per_run} |"
        )
    total = time.perf_counter() - start
    summary = (
        f"Config `{Path(args.config).name}` (read at run time), {steps} optimizer steps per run, seeds "
        f"{args.seeds}, policy: {policy.description}. Step-0 greedy validation accuracy: {baseline:.3f}. "
        f"Total wall time {total / 60:.1f} min."
    )
    print(summary)
    print("\n".join(table))
    if done:
        plot({m: curves[m] for m in done}, FIGURES / "compare_methods.png", f"{steps} steps, seeds {args.seeds}")
    if not args.no_write and done:
        write_results_section(
            SECTION,
            [
                "## GRPO vs SEED-GRPO vs GCPO (compare_methods.py)",
                "",
                run_header(args.threads),
                summary,
                "",
                *table,
                "",
                "Curves (mean ± std over seeds): `benchmarks/figures/compare_methods.png`.",
                "",
                reading(done, steps, {m: weights[m] for m in done}, paired_seeds),
            ],
        )


def reading(finals: dict[str, list[float]], steps: int, weights: dict[str, list[float]], paired: bool) -> str:
    """A reading derived from the numbers: differences smaller than the seed spread are not differences."""
    stats = {m: summarise(v) for m, v in finals.items()}
    order = sorted(stats, key=lambda m: -stats[m][0])
    top, rest = order[0], order[1:]
    separated = [m for m in rest if stats[top][3] < stats[m][2] or stats[m][3] < stats[top][2]]
    few = min(len(v) for v in finals.values()) < 3
    spread = max(s[1] for s in stats.values())
    text = (
        f"Reading (generated from the numbers). Highest mean final accuracy: {top} ({stats[top][0]:.3f}). "
        f"The largest seed std is {spread:.3f}; a greedy accuracy on the validation prompts also carries "
        f"binomial noise of about sqrt(p(1-p)/n). "
    )
    if few:
        text += "Fewer than 3 seeds per method: no comparison can be read from this run (a smoke test). "
    elif not separated:
        text += "The seed ranges of all methods overlap: compared unpaired, this run shows no difference between them. "
    else:
        text += f"{top}'s seed range does not overlap that of {', '.join(separated)}; with 3 seeds this is a hint, "
        text += "not a significant result. "
    if paired and not few and "grpo" in finals:
        for method in (m for m in finals if m != "grpo"):
            differences = np.asarray(finals[method]) - np.asarray(finals["grpo"])
            same_sign = bool((differences > 0).all() or (differences < 0).all())
            text += (
                f"Paired by seed, {method} - grpo = {', '.join(f'{d:+.3f}' for d in differences)} (mean "
                f"{differences.mean():+.3f}{', the same sign for every seed' if same_sign else ''}). "
            )
        text += (
            f"With {len(finals['grpo'])} seeds, even a same-sign paired difference has a 1 in "
            f"{2 ** (len(finals['grpo']) - 1)} chance of arising from noise alone: more seeds would settle it. "
        )
    drift = max((abs(1.0 - float(np.mean(w))) for w in weights.values() if w), default=0.0)
    if drift < 0.05:
        text += (
            f"Every method's mean advantage weight is within {drift:.3f} of 1, and Adam is nearly invariant to a "
            "global gradient scale: on this task the three methods make almost the same updates, so similar "
            "accuracies are expected and say little about the signals themselves. "
        )
    return text + f"{steps} steps on one synthetic task and one tiny policy."


if __name__ == "__main__":
    main()
