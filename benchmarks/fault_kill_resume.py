"""Fault injection: kill -9 a `lit-gcpo fit` at random moments and during checkpoint writes, resume with
`--ckpt_path last`, and compare the final weights and optimizer state with an uninterrupted run.

Set-up: the quickstart config on a small random Llama (built here, offline), a checkpoint after every optimizer
step (``stepN.ckpt`` and ``last.ckpt``; ``--checkpoints quickstart``: the quickstart's own checkpoint callback,
best ``val/accuracy`` plus ``last.ckpt``, with a validation every 2 steps), the system temp folder on another
filesystem (``TMPDIR=/dev/shm``, the condition under which Lightning's own writer left a 0-byte ``last.ckpt``).
Each trial:

1. starts the fit in a fresh root directory and SIGKILLs it either at a uniformly random moment of its
   training, between its first and its last checkpoint (``random``), or as soon as a checkpoint's
   temporary file appears once a random number of step checkpoints is complete (``write``: the kill lands
   inside ``AtomicCheckpointIO``'s write; a temporary file left behind confirms it);
2. resumes with ``--ckpt_path last`` (from scratch when no checkpoint was complete yet) up to the same step;
3. compares the newest checkpoint's policy weights and Adam moments with the reference run's (max |diff|)
   and checks that every ``*.ckpt`` left in the root directory loads.

    python benchmarks/fault_kill_resume.py --trials 6 --steps 10 [--checkpoints quickstart]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section

from lit_gcpo.running.checkpointing import check_checkpoint, newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]


def build_model(path: Path) -> None:
    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model

    if (path / "config.json").is_file():
        return
    config = build_tiny_config(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
    build_tiny_model(config, seed=0).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)


def fit_config(model: Path, root: Path, steps: int, checkpoints: str = "every-step") -> dict[str, Any]:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, default_root_dir=str(root), enable_progress_bar=False, num_sanity_val_steps=0)
    trainer["logger"]["init_args"]["save_dir"] = str(root)
    config["model"].update(model=str(model), log_samples_every_n_steps=0, export_dir=None)
    config["data"].update(batch_size=4, group_size=4, val_batch_size=16)
    config["data"]["sampling"]["max_new_tokens"] = 8
    for split in ("train", "val"):
        config["data"][split]["init_args"].update(num_train=256, num_val=16)
    if checkpoints == "quickstart":  # its callbacks as shipped; validations often enough to checkpoint
        trainer.update(val_check_interval=2)
        return config
    trainer.update(limit_val_batches=0)
    trainer["callbacks"] = [
        trainer["callbacks"][0],  # the uncertainty callback of the quickstart
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "every_n_train_steps": 1,
                "save_top_k": -1,
                "save_last": True,
                "filename": "step{step}",
                "auto_insert_metric_name": False,
            },
        },
    ]
    return config


def command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", str(config_path), *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "TMPDIR": "/dev/shm", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(config_path: Path, log: Path, *extra: str) -> None:
    with open(log, "a") as handle:
        done = subprocess.run(command(config_path, *extra), env=environment(), stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}), see {log}")


def run_and_kill(
    config_path: Path, root: Path, log: Path, mode: str, at_s: float, after: int, complete: str = "step*.ckpt"
) -> dict[str, Any]:
    """Start a fit and SIGKILL it ``at_s`` seconds after its first checkpoint appeared (``random``: a moment of
    training) or at the first temporary checkpoint file seen once ``after`` checkpoints matching ``complete``
    exist (``write``)."""
    with open(log, "a") as handle:
        process = subprocess.Popen(command(config_path), env=environment(), stdout=handle, stderr=subprocess.STDOUT)
    start = time.monotonic()
    killed_at = training_since = None
    while process.poll() is None:
        elapsed = time.monotonic() - start
        if training_since is None and any(root.rglob("*.ckpt")):
            training_since = elapsed
        writing = mode == "write" and any(root.rglob(".*.ckpt.tmp-*")) and len(list(root.rglob(complete))) >= after
        if (mode == "random" and training_since is not None and elapsed - training_since >= at_s) or writing:
            process.send_signal(signal.SIGKILL)
            killed_at = elapsed
            break
        time.sleep(0.001 if mode == "write" else 0.01)
    process.wait()
    leftovers = sorted(p.name for p in root.rglob(".*.ckpt.tmp-*"))
    return {"killed_at_s": killed_at, "exit": process.returncode, "left_temporary": leftovers}


def final_state(root: Path) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], int]:
    checkpoint = torch.load(newest_complete_checkpoint(str(root)), map_location="cpu", weights_only=True)
    moments = [
        value
        for state in checkpoint["optimizer_states"][0]["state"].values()
        for key, value in sorted(state.items())
        if key in ("exp_avg", "exp_avg_sq")
    ]
    return checkpoint["state_dict"], moments, int(checkpoint["global_step"])


def max_difference(a: tuple, b: tuple) -> tuple[float, float]:
    weights = max((a[0][k].float() - b[0][k].float()).abs().max().item() for k in a[0])
    moments = max((x - y).abs().max().item() for x, y in zip(a[1], b[1], strict=True))
    return weights, moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="half killed at random moments, half during writes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fault_kill_resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoints",
        choices=("every-step", "quickstart"),
        default="every-step",
        help="a checkpoint after every step, or the quickstart config's own checkpoint callback",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "model"
    build_model(model)

    reference_root = args.out / "reference"
    reference_config = args.out / "reference.yaml"
    reference_config.write_text(yaml.safe_dump(fit_config(model, reference_root, args.steps, args.checkpoints)))
    start = time.monotonic()
    run(reference_config, args.out / "reference.log")
    reference_s = time.monotonic() - start
    stamps = sorted(p.stat().st_mtime for p in reference_root.rglob("*.ckpt"))
    training_s = stamps[-1] - stamps[0]  # from the first checkpoint to the last: the span a kill may hit
    reference = final_state(reference_root)
    assert reference[2] == args.steps

    rows = []
    for trial in range(args.trials):
        mode = "random" if trial % 2 == 0 else "write"
        root = args.out / f"trial{trial}"
        config_path = args.out / f"trial{trial}.yaml"
        config_path.write_text(yaml.safe_dump(fit_config(model, root, args.steps, args.checkpoints)))
        log = args.out / f"trial{trial}.log"
        at_s = rng.uniform(0.0, 1.0) * training_s
        if args.checkpoints == "quickstart":  # no step files: any write once last.ckpt exists
            kill = run_and_kill(config_path, root, log, mode, at_s, after=1, complete="last.ckpt")
        else:
            kill = run_and_kill(config_path, root, log, mode, at_s, after=rng.randint(1, args.steps - 2))
        try:
            resume_from = newest_complete_checkpoint(str(root))
            step_before = int(torch.load(resume_from, map_location="cpu", weights_only=True)["global_step"])
            run(config_path, log, "--ckpt_path", "last")
        except FileNotFoundError:  # killed before the first complete checkpoint: start again
            step_before = 0
            run(config_path, log)
        for checkpoint in root.rglob("*.ckpt"):
            check_checkpoint(str(checkpoint))  # raises on a torn file
        weights, moments = max_difference(reference, final_state(root))
        rows.append((trial, mode, kill, step_before, weights, moments))
        print(trial, mode, kill, step_before, weights, moments, flush=True)

    setting = (
        "the quickstart's own checkpoint callback (best val/accuracy and last.ckpt), a validation every 2 steps"
        if args.checkpoints == "quickstart"
        else "a checkpoint after every step"
    )
    lines = [
        "## Fault injection: kill -9 during fit and checkpoint writes, then resume (fault_kill_resume.py"
        + (", --checkpoints quickstart)" if args.checkpoints == "quickstart" else ")"),
        "",
        run_header(threads=1),
        f"{args.steps} optimizer steps of the quickstart config on a random 2-layer, 128-wide Llama; {setting}; "
        "TMPDIR=/dev/shm (the temp folder on another filesystem). Reference run "
        f"{reference_s:.0f} s ({training_s:.0f} s from its first checkpoint to its last). Each trial: SIGKILL, "
        "then `--ckpt_path last` up to the same step; every `*.ckpt` left in the run's root loads (torn files "
        "would fail `check_checkpoint`).",
        "",
        "| trial | kill | killed at (s after start) | temporary file left (kill inside a write) | resumed from step "
        "| max abs diff, weights | max abs diff, Adam moments |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for trial, mode, kill, step_before, weights, moments in rows:
        left = ", ".join(kill["left_temporary"]) or "no"
        killed = f"{kill['killed_at_s']:.1f}" if kill["killed_at_s"] is not None else "finished first"
        lines.append(f"| {trial} | {mode} | {killed} | {left} | {step_before} | {weights:.3g} | {moments:.3g} |")
    exact = sum(1 for row in rows if row[4] == 0.0 and row[5] == 0.0)
    inside = sum(1 for row in rows if row[2]["left_temporary"])
    lines += [
        "",
        f"{exact} of {len(rows)} trials resumed bit-exactly (0.0 difference); {inside} kills landed inside a "
        "checkpoint write (a temporary file was left, and the previous checkpoint was used).",
    ]
    write_results_section("fault_kill_resume" + ("_quickstart" if args.checkpoints == "quickstart" else ""), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
