"""The method comparison's runner: one ``lit-gcpo fit`` per (testbed, method, seed), one JSON line per finished run.

Every run is a fresh ``python -m lit_gcpo.running.cli fit`` on the base config (``configs/compare_arithmetic.yaml``: the
quickstart's setting, no padding) with only these overrides:

- the ``UncertaintyCallback``'s weighting (``METHODS``); clustering, embedding source and centring stay the
  config's, so the methods differ only in the advantage weights: ``grpo`` w = 1; ``seed_grpo`` the official rule
  (inverse, alpha 0.0417, no scale, no normalisation); ``seed_grpo_sf`` SE_n with gcpo's scale-free rule;
  ``gcpo_bot`` / ``gcpo_cd`` U_c = BoT or CD times (1 - RD); ``rd_only`` U = 1 (1 - RD alone), the control of
  METHODS.md 5.1 that gcpo's geometry has to beat;
- for the wider family (METHODS.md §7, issue 21), w = 1 and the method's own settings (``METHOD_SETTINGS``), taken
  from its ``configs/methods/<name>.yaml``: the token selections ``high_entropy_tokens``, ``clip_cov``, ``kl_cov``
  (``model.token_selection``) and the label-free rewards ``ttrl``, ``empo``, ``self_certainty``, ``rent``
  (``data.label_free``, no extra reward). A label-free method reads no reward, so it does not run on the noisy arms
  (their noise is in the reward: the run would be ``arithmetic``'s), and the answer votes (``ttrl``, ``empo``) do not
  run on ``qa`` (its answers are free text, not boxed: every completion would be unanswered) (``runs_on``);
- the testbed (``TESTBEDS``): ``arithmetic`` is the base config; ``noisy_hard`` / ``noisy_easy`` swap the train
  source for ``NoisyArithmeticTask`` with coin-flip rewards on half of the hard (two-digit or negative answer)
  or of the easy (one-digit answer) prompts, at the noise rate whose coin-flip groups have the clean spread
  groups' distribution of k correct (``benchmarks/match_noise_rate.py``); validation stays clean; ``qa`` is
  ``configs/compare_qa.yaml`` (``--qa-config``): the embedded QA task with near-synonym answers, embedding
  clustering over all-MiniLM-L6-v2, its own warm-started policy (``benchmarks/data/tiny-qa``);
- the seed: ``seed_everything`` and ``data.seed`` (prompt order and sampling); the prompts themselves (the
  sources' seeds) stay the config's, so a seed gives every method the same prompt order: runs pair by seed.

A finished run appends one line to ``--results`` (``benchmarks/results/compare_methods.jsonl``, committed, so
seeds accumulate across machines and days) as soon as it ends: testbed, method, seed, the budget, the
validation curve (step 0 = the starting policy), the weight spread, the truncated share, wall time, the commit
and ``config_sha``, a hash of the run's fully resolved config (``lit-gcpo fit --print_config``) without its seed
and output paths (``design_sha``: the same without the method, i.e. the weighting and the method's own settings,
shared by the methods that the analysis pairs). Options added after records began (``UNHASHED_AT_DEFAULT``) are left
out of both hashes while they hold their default, so the methods that do not set them keep their hashes
(``benchmarks/compare_hashes.py`` checks a change against the tree before it).
A rerun skips every planned run whose record exists with the same ``config_sha``, so a kill
loses only the runs in flight and a changed config (or a changed default) starts new records instead of mixing
with old ones. ``--shard i/n`` runs every n-th planned run from the i-th, for several machines. The analysis
(``benchmarks/compare_report.py``) reads only the results file.

    python benchmarks/compare_methods.py --seeds 0 --methods grpo gcpo_bot --steps 4 --results /tmp/r.jsonl  # smoke
    python benchmarks/compare_methods.py --seeds 0-11 --testbeds arithmetic noisy_hard noisy_easy
    python benchmarks/compare_methods.py --seeds 0-11 --shard 1/2     # on a second machine: --shard 2/2
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS_FILE = REPO / "benchmarks" / "results" / "compare_methods.jsonl"
CALLBACK = "lit_gcpo.callbacks.UncertaintyCallback"
ACCURACY = "val/accuracy"
WEIGHTING_KEYS = ("method", "geometric", "family", "alpha", "scale", "normalise", "gamma")
METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"method": "grpo"},
    "seed_grpo": {"method": "seed_grpo"},
    "seed_grpo_sf": {"method": "seed_grpo", "alpha": 1.0, "scale": "batch_mean", "normalise": True},
    "gcpo_bot": {"method": "gcpo", "geometric": "bot"},
    "gcpo_cd": {"method": "gcpo", "geometric": "cd"},
    "rd_only": {"method": "rd_only"},
    **{name: {"method": "grpo"} for name in ("high_entropy_tokens", "clip_cov", "kl_cov")},
    **{name: {"method": "grpo"} for name in ("ttrl", "empo", "self_certainty", "rent")},
}
METHOD_CONFIGS = REPO / "configs" / "methods"
TOKEN_SELECTION = (("model", "token_selection"),)
LABEL_FREE = (("data", "label_free"), ("data", "rewards"))
METHOD_SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "high_entropy_tokens": TOKEN_SELECTION,
    "clip_cov": TOKEN_SELECTION,
    "kl_cov": TOKEN_SELECTION,
    "ttrl": LABEL_FREE,
    "empo": LABEL_FREE,
    "self_certainty": LABEL_FREE,
    "rent": LABEL_FREE,
}
"""The settings (group, key) a method takes from its ``configs/methods/<name>.yaml`` besides the weighting."""
UNHASHED_AT_DEFAULT = ((("model", "token_selection"), None), (("data", "label_free"), None))
"""Options that did not exist when the first records were written, left out of the hashes at their default."""
NOISY_SOURCE = "lit_gcpo.tasks.noisy_arithmetic.NoisyArithmeticTask"
NOISY_REWARD = "lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"
# Noise on half of the prompts of one kind: about a quarter of all training prompts in either arm.
NOISY_SHARE = 0.5
# The rate whose Bin(8, p) groups with 1-7 correct match the clean spread groups' k (match_noise_rate.py).
NOISE_RATE = 0.18
TESTBEDS: dict[str, dict[str, Any]] = {
    "arithmetic": {},
    "noisy_hard": {"noisy_answers": "long"},  # premise plausible: the noise is where the policy disagrees
    "noisy_easy": {"noisy_answers": "short"},  # premise false: the noise is where the policy agrees
    "qa": {},  # its own base config (--qa-config): free-text answers, embedding clustering
}
NOISY_TESTBEDS = ("noisy_hard", "noisy_easy")
# Settings that name where a run writes, or its seed: left out of config_sha.
_UNHASHED = (
    ("seed_everything",),
    ("data", "seed"),
    ("trainer", "default_root_dir"),
    ("trainer", "logger"),
    ("model", "export_dir"),
)


def runs_on(method: str, testbed: str) -> bool:
    """Whether ``method`` runs on ``testbed`` (the module docstring says which do not, and why)."""
    if METHOD_SETTINGS.get(method) is LABEL_FREE and testbed in NOISY_TESTBEDS:
        return False
    return not (method in ("ttrl", "empo") and testbed == "qa")


def method_settings(method: str) -> dict[str, dict[str, Any]]:
    """``{group: {key: value}}`` of ``METHOD_SETTINGS[method]`` as its ``configs/methods/<method>.yaml`` sets them."""
    keys = METHOD_SETTINGS.get(method, ())
    if not keys:
        return {}
    config = yaml.safe_load((METHOD_CONFIGS / f"{method}.yaml").read_text())
    settings: dict[str, dict[str, Any]] = {}
    for group, key in keys:
        settings.setdefault(group, {})[key] = copy.deepcopy(config[group][key])
    return settings


def run_config(
    base: dict[str, Any], testbed: str, method: str, seed: int, run_dir: Path, with_settings: bool = True
) -> dict[str, Any]:
    """The base config with the comparison's overrides (module docstring) for one run writing under ``run_dir``;
    ``with_settings=False`` leaves out the method's own settings (the run's design)."""
    config = copy.deepcopy(base)
    trainer = config.setdefault("trainer", {})
    config["seed_everything"] = seed
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "tb", "version": "run"},
    }
    callbacks = trainer.get("callbacks") or []
    original = next((c for c in callbacks if c.get("class_path") == CALLBACK), None)
    init_args = {k: v for k, v in (original or {}).get("init_args", {}).items() if k not in WEIGHTING_KEYS}
    init_args.update(METHODS[method])
    others = [c for c in callbacks if c.get("class_path") != CALLBACK and "ModelCheckpoint" not in c["class_path"]]
    trainer["callbacks"] = [{"class_path": CALLBACK, "init_args": init_args}, *others]
    trainer["enable_checkpointing"] = False  # the record is the result; a killed run is rerun whole
    config.setdefault("model", {})["export_dir"] = str(run_dir / "policy")
    data = config.setdefault("data", {})
    data["seed"] = seed
    if testbed in NOISY_TESTBEDS:
        noisy = {"noisy_levels": [2], "noisy_share": NOISY_SHARE, "noise_rate": NOISE_RATE, **TESTBEDS[testbed]}
        data["train"] = {"class_path": NOISY_SOURCE, "init_args": {**data["train"]["init_args"], **noisy}}
        accuracy = data.get("accuracy_reward", "math_accuracy_final")
        data["rewards"] = [NOISY_REWARD, accuracy]  # the true accuracy rides along at weight 0: train/accuracy
        data["reward_weights"] = [1.0, 0.0]
        data["accuracy_reward"] = accuracy
    for group, values in (method_settings(method) if with_settings else {}).items():
        config.setdefault(group, {}).update(values)
    return config


def _drop(config: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = config
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def config_sha(resolved: dict[str, Any], weighting: bool = True) -> str:
    """Hash of a resolved config without its seed and output paths (``_UNHASHED``): the runs of one method on one
    design share it. ``weighting=False`` also leaves out the uncertainty callback's weighting (``WEIGHTING_KEYS``):
    the ``design_sha`` that every method of one comparison shares, by which the analysis pairs them."""
    config = copy.deepcopy(resolved)
    for path in _UNHASHED:
        _drop(config, path)
    for path, default in UNHASHED_AT_DEFAULT:
        parent = config.get(path[0])
        if isinstance(parent, dict) and parent.get(path[1], default) == default:
            _drop(config, path)
    if not weighting:
        for callback in (config.get("trainer") or {}).get("callbacks") or []:
            if isinstance(callback, dict) and callback.get("class_path") == CALLBACK:
                for key in WEIGHTING_KEYS:
                    callback.get("init_args", {}).pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_hashes(base: dict[str, Any], testbed: str, method: str, directory: Path) -> tuple[str, str]:
    """``(config_sha, design_sha)`` of ``method`` on ``testbed``: the design is the run's config without the
    weighting and without the method's own settings, so every method of one testbed shares it."""
    resolved = resolve(run_config(base, testbed, method, 0, directory), directory)
    if not METHOD_SETTINGS.get(method):
        return config_sha(resolved), config_sha(resolved, weighting=False)
    design_dir = directory / "design"
    design = resolve(run_config(base, testbed, method, 0, design_dir, with_settings=False), design_dir)
    return config_sha(resolved), config_sha(design, weighting=False)


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def resolve(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The fully resolved config of ``config`` (every default filled in) by ``lit-gcpo fit --print_config``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "unresolved.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", str(path), "--print_config"]
    done = subprocess.run(command, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return yaml.safe_load(done.stdout)


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


def validation_curve(log_dir: Path) -> list[list[float]]:
    """``[optimizer step, greedy accuracy]`` of every validation: the baseline at 0, then after step k.

    The module writes the sanity check's full validation at logger step 0; Lightning logs the validation that
    follows optimizer step k at logger step k - 1.
    """
    values = [(step, round(value, 6)) for step, value in read_scalars(log_dir, ACCURACY)]  # float32 in the logs
    return [[0, value] if index == 0 else [step + 1, value] for index, (step, value) in enumerate(values)]


def summarise(log_dir: Path, steps: int) -> dict[str, Any]:
    """The measured fields of a finished run's record, from its TensorBoard logs; raises when it did not finish."""
    curve = validation_curve(log_dir)
    if len(curve) < 2 or curve[-1][0] != steps:
        raise RuntimeError(f"{log_dir}: no validation at step {steps} (curve {curve}): the run did not finish")
    stds = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_std")]
    lows = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_min")]
    highs = [v for _, v in read_scalars(log_dir, "uncertainty/weight_spread_max")]
    truncated = read_scalars(log_dir, "completion/truncated_frac")
    lengths = read_scalars(log_dir, "val/completion_length")
    return {
        "start_val_accuracy": curve[0][1],
        "final_val_accuracy": curve[-1][1],
        "val_curve": curve,
        "weight_std_mean": sum(stds) / len(stds) if stds else None,
        "weight_min": min(lows) if lows else None,
        "weight_max": max(highs) if highs else None,
        "truncated_frac_final": truncated[-1][1] if truncated else None,
        "val_completion_length_final": lengths[-1][1] if lengths else None,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file (none when it does not exist); a torn last line (a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number}: not a JSON record, skipped", file=sys.stderr)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, under an exclusive lock so that runs of several processes never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False) + "\n"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
        fcntl.flock(handle, fcntl.LOCK_UN)


def parse_seeds(items: list[str]) -> list[int]:
    """``["0-3", "7"]`` -> ``[0, 1, 2, 3, 7]``."""
    seeds: list[int] = []
    for item in items:
        low, _, high = item.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1-based) -> ``(i - 1, n)``; a clear error otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard: expected i/n such as 1/2, got {text!r}") from None
    if not 1 <= index <= count:
        raise SystemExit(f"--shard: need 1 <= i <= n, got {text!r}")
    return index - 1, count


def plan(
    testbeds: list[str], methods: list[str], seeds: list[int], official_seeds: int
) -> Iterator[tuple[str, str, int]]:
    """Seed-major, so that an interrupted comparison has every method at the first seeds. ``seed_grpo`` (the
    official rule, whose weights barely move) runs only for the first ``official_seeds`` seeds; a method runs only on
    the testbeds it ``runs_on``."""
    for seed in seeds:
        for testbed in testbeds:
            for method in methods:
                if method == "seed_grpo" and seeds.index(seed) >= official_seeds:
                    continue
                if not runs_on(method, testbed):
                    continue
                yield testbed, method, seed


def git_commit() -> str:
    """The commit the runs use, ``+dirty`` when the tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    return head + ("+dirty" if dirty.stdout.strip() else "")


def launch(config: dict[str, Any], run_dir: Path, threads: int, timeout: float) -> float:
    """``lit-gcpo fit`` on ``config`` in a fresh process, logging to ``run_dir/fit.log``; returns its wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run killed earlier: its version folder would be refused
    run_dir.mkdir(parents=True)
    config_path = run_dir / "fit_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", str(config_path)]
    start = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log_file:
        done = subprocess.run(
            command, cwd=REPO, env=_env(threads), stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout
        )
    if done.returncode != 0:
        tail = (run_dir / "fit.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_arithmetic.yaml"))
    parser.add_argument("--qa-config", default=str(REPO / "configs" / "compare_qa.yaml"), help="the qa testbed's")
    parser.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", default=["0-11"], help="seeds or ranges, e.g. 0-11 15")
    parser.add_argument("--official-seeds", type=int, default=5, help="seeds of seed_grpo (the official rule)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--results", default=str(RESULTS_FILE), help="the JSON-lines file the records go to")
    parser.add_argument("--out", default=str(REPO / "runs" / "compare_methods"), help="run directories")
    parser.add_argument("--shard", default="1/1", help="i/n: run planned runs i, i + n, i + 2n, ...")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is done; train nothing")
    args = parser.parse_args(argv)

    config_files = {t: Path(args.qa_config if t == "qa" else args.config) for t in args.testbeds}
    bases = {t: yaml.safe_load(path.read_text()) for t, path in config_files.items()}
    for base in bases.values():
        if args.steps is not None:
            base["trainer"]["max_steps"] = args.steps
            interval = base["trainer"].get("val_check_interval", args.steps)
            base["trainer"]["val_check_interval"] = min(interval, args.steps)
    results, out = Path(args.results).resolve(), Path(args.out).resolve()
    shard_index, shard_count = parse_shard(args.shard)
    seeds = parse_seeds(args.seeds)
    jobs = list(plan(args.testbeds, args.methods, seeds, args.official_seeds))[shard_index::shard_count]
    commit = git_commit()
    shas: dict[tuple[str, str], str] = {}  # per (testbed, method): the seed is not hashed
    designs: dict[tuple[str, str], str] = {}  # the same without the weighting: shared by the methods
    for testbed, method in dict.fromkeys((t, m) for t, m, _ in jobs):
        scratch = out / "resolved" / testbed / method
        shas[testbed, method], designs[testbed, method] = run_hashes(bases[testbed], testbed, method, scratch)
    done = {(r["testbed"], r["method"], r["seed"], r["config_sha"]) for r in read_records(results)}
    todo = [(t, m, s) for t, m, s in jobs if (t, m, s, shas[t, m]) not in done]
    print(
        f"{len(jobs)} planned runs in shard {args.shard}, {len(jobs) - len(todo)} recorded, {len(todo)} to run "
        f"(commit {commit}, results {results})",
        flush=True,
    )
    if args.dry_run:
        for testbed, method, seed in todo:
            print(f"  {testbed} {method} seed {seed} config_sha {shas[testbed, method]}")
        return
    for testbed, method, seed in todo:
        sha = shas[testbed, method]
        run_dir = out / sha / testbed / method / f"seed{seed}"
        config = run_config(bases[testbed], testbed, method, seed, run_dir)
        steps = int(config["trainer"]["max_steps"])
        wall = launch(config, run_dir, args.threads, args.timeout)
        record = {
            "testbed": testbed,
            "method": method,
            "seed": seed,
            "steps": steps,
            "batch_size": int(config["data"]["batch_size"]),
            "group_size": int(config["data"]["group_size"]),
            **summarise(run_dir / "tb" / "run", steps),
            "val_size": val_size(config),
            "wall_s": round(wall, 1),
            "threads": args.threads,
            "commit": commit,
            "config_sha": sha,
            "design_sha": designs[testbed, method],
            "config": config_files[testbed].name,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        append_record(results, record)
        print(
            f"{testbed} {method} seed {seed}: {record['start_val_accuracy']:.3f} -> "
            f"{record['final_val_accuracy']:.3f} in {wall:.0f} s",
            flush=True,
        )


def val_size(config: dict[str, Any]) -> int:
    """Rows of the run's validation source (the same class and arguments the run loads)."""
    module, _, name = config["data"]["val"]["class_path"].rpartition(".")
    source = getattr(importlib.import_module(module), name)(**config["data"]["val"].get("init_args", {}))
    return len(source.load())


if __name__ == "__main__":
    main()
