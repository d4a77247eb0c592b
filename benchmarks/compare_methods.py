"""GRPO vs SEED-GRPO vs GCPO (and the rd_only control) on two embedded testbeds: same budget, paired seeds.

Every run is ``lit-gcpo fit`` (``python -m lit_gcpo.running.cli``, a fresh process each) on
``configs/compare_arithmetic.yaml`` (the quickstart as it was before issue 11 retuned it; ``--config`` for
another), read at run time, with only these overrides:

- the ``UncertaintyCallback``'s weighting (``METHODS`` below); clustering, embedding source and centring stay
  the config's. The methods therefore differ only in the advantage weights:
  ``grpo`` w = 1; ``seed_grpo`` the official rule (inverse, alpha 0.0417, no scale, no normalisation);
  ``seed_grpo_sf`` SE_n with gcpo's scale-free rule (u = SE_n / step mean, w = 1/(1+u), mean 1);
  ``gcpo_bot`` / ``gcpo_cd`` U_c = BoT or CD times (1 - RD), same rule; ``rd_only`` U = 1 (1 - RD alone),
  the control of METHODS.md §5.1 that gcpo's geometry has to beat;
- the testbed: ``arithmetic`` is the config's task; ``noisy`` swaps the train source for
  ``lit_gcpo.tasks.noisy_arithmetic.NoisyArithmeticTask`` (same problems, coin-flip rewards on the level-3/4
  prompts; validation clean) with reward ``noisy_math_accuracy`` and ``math_accuracy`` at weight 0 (so that
  ``train/accuracy`` stays the true accuracy);
- the seed: ``seed_everything`` and ``data.seed`` (prompt order and sampling); the train and validation prompts
  (the sources' own seeds) stay the config's, so every run is validated on the same prompts and a seed gives
  the same prompt order to every method: differences are paired by seed;
- ``trainer.max_steps`` (``--steps``) and ``data.batch_size`` (``--batch-size``), validation on the last
  step, logs under ``--out``; the final policy is exported to the run's directory (``policy/``) for the
  faithfulness diagnostic of the same policies (``uncertainty_faithfulness.py --compare-dir``).

Reported per testbed and method: final greedy validation accuracy (mean, sample std, per seed), the paired
difference to GRPO with a percentile-bootstrap 95% interval over seeds, and the weight spread over the groups
with reward spread (mean per-step std, min, max over the run), from the callback's logged statistics.

    python benchmarks/compare_methods.py --steps 10 --seeds 0 --methods grpo gcpo_bot   # smoke test
    python benchmarks/compare_methods.py --steps 100 --seeds 0 1 2 3 4 --jobs 2
    python benchmarks/compare_methods.py --collect-only ...                              # re-read finished runs
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
WEIGHTING_KEYS = ("method", "geometric", "family", "alpha", "scale", "normalise", "gamma")
METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"method": "grpo"},
    "seed_grpo": {"method": "seed_grpo"},
    "seed_grpo_sf": {"method": "seed_grpo", "alpha": 1.0, "scale": "batch_mean", "normalise": True},
    "gcpo_bot": {"method": "gcpo", "geometric": "bot"},
    "gcpo_cd": {"method": "gcpo", "geometric": "cd"},
    "rd_only": {"method": "rd_only"},
}
NOISY_SOURCE = "lit_gcpo.tasks.noisy_arithmetic.NoisyArithmeticTask"
NOISY_REWARD = "lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"
TESTBEDS = ("arithmetic", "noisy")


def run_config(
    base: dict[str, Any], testbed: str, method: str, seed: int, steps: int, out: Path, batch_size: int | None = None
) -> dict[str, Any]:
    """The base config with the benchmark's overrides (module docstring) for one run."""
    config = copy.deepcopy(base)
    trainer = config.setdefault("trainer", {})
    run_dir = out / testbed / method / f"seed{seed}"
    config["seed_everything"] = seed
    trainer.update(max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None)
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out / testbed), "name": method, "version": f"seed{seed}"},
    }
    others = [c for c in trainer.get("callbacks") or [] if c.get("class_path") not in (CALLBACK,)]
    others = [c for c in others if "ModelCheckpoint" not in c.get("class_path", "")]  # no checkpoints needed
    original = next((c for c in trainer.get("callbacks") or [] if c.get("class_path") == CALLBACK), None)
    init_args = {k: v for k, v in (original or {}).get("init_args", {}).items() if k not in WEIGHTING_KEYS}
    init_args.update(METHODS[method])
    trainer["callbacks"] = [{"class_path": CALLBACK, "init_args": init_args}, *others]
    trainer["enable_checkpointing"] = False
    trainer["num_sanity_val_steps"] = 0  # the starting policy is validated once, by baseline_accuracy
    config.setdefault("model", {})["export_dir"] = str(run_dir / "policy")
    data = config.setdefault("data", {})
    data["seed"] = seed
    if batch_size is not None:
        data["batch_size"] = batch_size
    if testbed == "noisy":
        data["train"] = {"class_path": NOISY_SOURCE, "init_args": dict(data["train"]["init_args"])}
        data["rewards"] = [NOISY_REWARD, "math_accuracy"]
        data["reward_weights"] = [1.0, 0.0]
        data["accuracy_reward"] = "math_accuracy"
    return config


def launch(subcommand: str, config: dict[str, Any], directory: Path, threads: int, timeout: float) -> float:
    """Run ``lit-gcpo <subcommand> --config`` in a fresh process; returns its wall time, raises on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{subcommand}_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lit_gcpo.running.cli", subcommand, "--config", str(config_path)]
    start = time.perf_counter()
    with open(directory / f"{subcommand}.log", "w") as log_file:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        tail = (directory / f"{subcommand}.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` in the TensorBoard event files under ``log_dir``, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return []
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return sorted((event.step, event.value) for event in accumulator.Scalars(tag))


def baseline_accuracy(base: dict[str, Any], out: Path, args: argparse.Namespace) -> float:
    """Greedy validation accuracy of the starting policy (``lit-gcpo validate``), measured once per ``--out``."""
    config = run_config(base, "arithmetic", "grpo", 0, 1, out)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), name="baseline", version="validate")
    config["trainer"]["callbacks"] = []
    log_dir = out / "baseline" / "validate"
    if not args.collect_only and not read_scalars(log_dir, METRIC):
        launch("validate", config, out / "baseline", args.threads, args.timeout)
    values = read_scalars(log_dir, METRIC)
    if not values:
        raise RuntimeError(f"no {METRIC} in {log_dir}: did `lit-gcpo validate` run?")
    return values[-1][1]


def paired_bootstrap(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of paired differences, resampling seeds."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def sign_flip_p(differences: np.ndarray) -> float:
    """Exact two-sided p-value of the paired sign-flip (randomisation) test of a zero mean difference: the share
    of the 2^n sign patterns whose |mean| is at least the observed one. With n = 5 seeds it cannot go below
    2/32 = 0.0625, which is the honest resolution of 5 paired runs."""
    n = len(differences)
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1).T  # [2^n, n]
    means = np.abs((signs * np.abs(differences)).mean(1))
    return float((means >= abs(differences.mean()) - 1e-12).mean())


def run_summary(log_dir: Path, steps: int) -> dict[str, Any] | None:
    """Final accuracy, validation curve and weight spread of one finished run (None when it did not finish)."""
    # Lightning logs the validation that follows optimizer step k at logger step k - 1.
    curve = [(s + 1, v) for s, v in read_scalars(log_dir, METRIC) if s + 1 == steps]
    if not curve:
        return None
    stds = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_std")]
    lows = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_min")]
    highs = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_max")]
    lengths = [v for s, v in read_scalars(log_dir, "val/completion_length") if s + 1 == steps]
    return {
        "final": curve[-1][1],
        "length": lengths[-1] if lengths else float("nan"),
        "weight_std": float(np.mean(stds)) if stds else float("nan"),
        "weight_min": min(lows) if lows else float("nan"),
        "weight_max": max(highs) if highs else float("nan"),
    }


def testbed_table(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> tuple[list[str], str]:
    """Markdown table of one testbed and its generated reading."""
    lines = [
        "| method | runs | final greedy val accuracy, mean ± std | per seed | minus GRPO, paired mean [95% bootstrap] "
        "| sign-flip p | weight std per step (RD > 0 groups), mean | weight min - max | final greedy length "
        "per seed (tokens) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    grpo = results.get("grpo", {})
    for method, runs in results.items():
        finals = np.array([runs[s]["final"] for s in seeds if s in runs])
        if finals.size == 0:
            continue
        std = finals.std(ddof=1) if finals.size > 1 else 0.0
        per_seed = ", ".join(f"{runs[s]['final']:.3f}" for s in seeds if s in runs)
        paired = [s for s in seeds if s in runs and s in grpo]
        versus, p_value = "—", "—"
        if method != "grpo" and len(paired) >= 2:
            differences = np.array([runs[s]["final"] - grpo[s]["final"] for s in paired])
            low, high = paired_bootstrap(differences)
            versus = f"{differences.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
            p_value = f"{sign_flip_p(differences):.3f}"
            if low > 0 or high < 0:
                notes.append(f"{method} {'above' if low > 0 else 'below'} GRPO ({versus}, sign-flip p {p_value})")
        weight_std = np.nanmean([runs[s]["weight_std"] for s in seeds if s in runs])
        low_w = np.nanmin([runs[s]["weight_min"] for s in seeds if s in runs])
        high_w = np.nanmax([runs[s]["weight_max"] for s in seeds if s in runs])
        lengths = ", ".join(f"{runs[s]['length']:.1f}" for s in seeds if s in runs)
        lines.append(
            f"| {method} | {finals.size} | {finals.mean():.3f} ± {std:.3f} | {per_seed} | {versus} | {p_value} "
            f"| {weight_std:.3f} | {low_w:.3f} - {high_w:.3f} | {lengths} |"
        )
        if method != "grpo" and weight_std < 0.02:
            notes.append(f"{method}'s weights barely move (std {weight_std:.3f} < 0.02): for this run it is GRPO")
    if notes:
        reading = "Bootstrap intervals that exclude 0, or flat weights: " + "; ".join(notes) + ". "
    else:
        reading = "No method's paired bootstrap interval excludes 0: this run shows no difference to GRPO. "
    reading += (
        f"A percentile bootstrap over {len(seeds)} seeds is too narrow (it under-covers with so few samples); the "
        f"exact sign-flip test is the honest check, and with {len(seeds)} seeds its smallest possible p-value is "
        f"{2 / 2 ** len(seeds):.3f}."
    )
    return lines, reading


def plot(curves: dict[str, dict[str, list[float]]], baseline: float, path: Path, title: str) -> None:
    """Final accuracy per seed (dots) and mean (bar) per method, one panel per testbed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for axis, (testbed, finals) in zip(axes[0], curves.items(), strict=True):
        names = list(finals)
        for index, name in enumerate(names):
            values = finals[name]
            axis.bar(index, np.mean(values), color="C0", alpha=0.3)
            axis.scatter([index] * len(values), values, color="C0", s=14)
        axis.axhline(baseline, color="grey", linestyle="--", label="starting policy")
        axis.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        axis.set_ylabel("final greedy validation accuracy")
        axis.set_title(f"{testbed}: {title}", fontsize=9)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_arithmetic.yaml"))
    parser.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=TESTBEDS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the config's)")
    parser.add_argument("--out", default=str(REPO / "runs" / "compare_methods"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run (1: shared cores)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--collect-only", action="store_true", help="re-read finished runs, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)

    base = yaml.safe_load(Path(args.config).read_text())
    steps = args.steps or int(base["trainer"]["max_steps"])
    out = Path(args.out).resolve()
    policy = resolve_policy(base.get("model", {}).get("model", "lit-gcpo/tiny-arith"))
    start = time.perf_counter()
    baseline = baseline_accuracy(base, out, args)
    # seed-major, so that an interrupted comparison still has every method at the first seeds
    jobs = [(t, m, s) for s in args.seeds for t in args.testbeds for m in args.methods]
    seconds: list[float] = []

    def run(job: tuple[str, str, int]) -> None:
        testbed, method, seed = job
        directory = out / testbed / method / f"seed{seed}"
        if run_summary(out / testbed / method / f"seed{seed}", steps) is not None:
            return  # finished earlier (an interrupted comparison resumes where it stopped)
        config = run_config(base, testbed, method, seed, steps, out, args.batch_size)
        seconds.append(launch("fit", config, directory, args.threads, args.timeout))
        print(f"{testbed} {method} seed {seed}: {seconds[-1]:.0f} s", flush=True)

    if not args.collect_only:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(run, jobs))
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for testbed in args.testbeds:
        for method in args.methods:
            for seed in args.seeds:
                summary = run_summary(out / testbed / method / f"seed{seed}", steps)
                if summary is not None:
                    results.setdefault(testbed, {}).setdefault(method, {})[seed] = summary
    total = time.perf_counter() - start
    if args.collect_only:  # the span of the runs themselves: first config written to last log line
        configs = list(out.glob("*/*/seed*/fit_config.yaml"))
        logs = list(out.glob("*/*/seed*/fit.log"))
        if configs and logs:
            total = max(f.stat().st_mtime for f in logs) - min(f.stat().st_mtime for f in configs)
            seconds = [
                (d / "fit.log").stat().st_mtime - (d / "fit_config.yaml").stat().st_mtime
                for d in (f.parent for f in logs)
                if (d / "fit_config.yaml").is_file()
            ]
    header = (
        f"Config `{Path(args.config).name}` (read at run time), {steps} optimizer steps per run of "
        f"{args.batch_size or base['data']['batch_size']} prompts x {base['data']['group_size']} completions, "
        f"seeds {args.seeds}, {args.jobs} runs at a time with {args.threads} thread each, "
        f"policy: {policy.description}. Starting policy's greedy validation accuracy: {baseline:.3f} (256 "
        f"validation prompts, the same for every run). Wall time {total / 60:.1f} min"
        + (f", {np.mean(seconds):.0f} s per run." if seconds else ".")
    )
    lines = ["## Method comparison on two testbeds (compare_methods.py)", "", run_header(args.threads), header, ""]
    finals = {}
    for testbed, by_method in results.items():
        table, reading = testbed_table(by_method, args.seeds)
        lines += [f"### {testbed}", "", *table, "", f"Reading (generated from the numbers): {reading}", ""]
        finals[testbed] = {m: [r["final"] for r in runs.values()] for m, runs in by_method.items()}
    print("\n".join(lines))
    if not args.no_write and finals:
        plot(finals, baseline, FIGURES / "compare_methods.png", f"{steps} steps, seeds {args.seeds}")
        lines.append("Final accuracies per seed: `benchmarks/figures/compare_methods.png`.")
        write_results_section(SECTION, lines)


if __name__ == "__main__":
    main()
