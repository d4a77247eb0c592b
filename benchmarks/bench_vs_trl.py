"""lit-gcpo against TRL's ``GRPOTrainer`` on the same work, side by side: median step time, its split, peak RSS.

    .venv/bin/python benchmarks/bench_vs_trl.py [--repeats 3] [--steps 30] [--betas 0 0.04]
        [--lit-python PATH] [--omp-wait-policy {PASSIVE,ACTIVE,unset}] [--keep] [--no-write]

TRL 1.16.0 lives in its own venv, ``.venv-trl`` (ignored by git), which the script makes when it is missing:
``python -m venv``, ``pip install torch==2.13.0`` (the local CPU wheel), then ``trl==1.16.0``, the project's
own ``transformers`` version (read from this venv) and ``tensorboard``. The project's dependencies do not
change. Each run is its own process (``vs_trl_runner.py``): TRL with the TRL venv's python, lit-gcpo with
this one (``lit_gcpo.running.cli.main``, the ``lit-gcpo`` command, with a timing callback added). Runs are
interleaved: for each repeat and each beta, TRL then lit-gcpo, the order alternating with the repeat.

The work (``vs_trl_work.py``), identical on both sides:

- policy: a random ``LlamaForCausalLM``, hidden 128, 2 layers, 4 heads, MLP 256, untied embeddings, 99-token
  character tokenizer (``PreTrainedTokenizerFast``: pad/bos/eos/unk and the 95 printable ASCII characters;
  no BOS added), 353,664 parameters, float32, dropout 0 (and disabled by both), saved once with
  ``save_pretrained`` to a temporary directory that both load;
- prompts: the 400 "What is A+B? Answer:" (A, B in [0, 19]) from one JSONL file (lit-gcpo:
  ``LocalFiles``, ``template: "{prompt}"``, ``chat: never``; TRL: ``datasets.load_dataset("json")``);
- reward: ``vs_trl_work.sum_reward``, 1 when the completion contains the sum as a whole number (lit-gcpo
  loads it by dotted path and, as for every user function, calls it in a child process; TRL in process);
- per optimizer step: 8 prompts x G = 8 completions of at most 32 new tokens, temperature 1, top-p 1, no
  top-k, sampled by ``model.generate`` (TRL) / the ``hf`` engine (lit-gcpo);
- loss: Dr. GRPO: advantages centred on the group mean without std scaling (lit-gcpo ``advantage:
  dr_grpo``; TRL ``scale_rewards="none"``), token losses summed and divided by completions x 32 (lit-gcpo
  ``loss_aggregation: seq_mean_token_sum_norm``; TRL ``loss_type="dr_grpo"``), clip 0.2; beta 0 and 0.04
  with the k3 estimator (TRL ``use_bias_correction_kl=False``: lit-gcpo's KL term is plain k3);
- one optimizer step per rollout (lit-gcpo ``num_iterations: 1``, one micro-batch; TRL
  ``num_iterations=1``, ``per_device_train_batch_size=64``, ``steps_per_generation=1``,
  ``gradient_accumulation_steps=1``), AdamW (``torch.optim.AdamW``; TRL ``optim="adamw_torch"``) lr 1e-5, no
  weight decay, constant schedule without warm-up, gradient-norm clip 1.0, fp32 (TRL ``bf16=False``), no
  gradient checkpointing (TRL defaults to it), seed 0;
- logging: every step, TensorBoard scalars on both sides (lit-gcpo ``TensorBoardLogger``; TRL
  ``report_to="tensorboard"``, ``log_completions=False``); no progress bar; no validation; no checkpoints
  (lit-gcpo ``trainer.enable_checkpointing false``, ``model.export_dir null``; TRL ``save_strategy="no"``);
  no uncertainty callback. lit-gcpo's other options are its defaults (nothing reads old log-probs, embeddings
  or answer clusters, so lit-gcpo computes none: one forward pass of the policy per step, as TRL).
- environment: CPU, torch threads left at their default (both report it), ``OMP_WAIT_POLICY=PASSIVE`` for
  both: lit-gcpo's CLI sets it itself, and without it TRL's steps on this shared 2-core machine were 5-30x
  slower (OpenMP threads spinning against other processes), which would measure the machine, not TRL
  (``--omp-wait-policy unset`` leaves each its own). Each framework runs in a venv of its own installation
  and nothing else: TRL in ``.venv-trl``, lit-gcpo in ``.venv-lit`` (``pip install -e .``, no extras; made by
  the script like the TRL venv) unless ``--lit-python`` names another venv's python. Why not the project's
  ``.venv``: it holds the dev extras (scikit-learn, matplotlib), which transformers and torchmetrics import
  whenever they are installed (+130 MiB of RSS measured), and TRL's venv has none of them.

Measured per run: the wall time of each optimizer step (between consecutive step ends, logging included),
median over the steps after the first three; the split of lit-gcpo's step from its logged ``time/*``
scalars and of TRL's from its own profiling timers (see ``vs_trl_runner.py``); completion tokens per step
(both must sample the same amount of work); peak RSS (``ru_maxrss``) of the training process, and of the
child processes it still has at the end (lit-gcpo's reward process). Reported per beta: the median over
repeats of the per-run medians, and the ratios lit-gcpo / TRL. The table goes to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import run_header, write_results_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from vs_trl_work import GROUP_SIZE, MAX_NEW_TOKENS, PROMPTS_PER_STEP, write_work  # noqa: E402

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
WARMUP_STEPS = 3  # steps left out of each run's median (allocations, first calls, the reward process start)


# ------------------------------------------------------------------------------------------------ venvs
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def make_venv(venv: Path, *installs: list[str]) -> Path:
    """Create ``venv`` when missing and run ``pip install`` once per entry of ``installs``, in order; returns its
    python. Raises naming the pip command that failed."""
    python = venv_python(venv)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for packages in installs:
        done = subprocess.run([*pip, *packages], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(pip + packages)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return python


def installed_versions(python: Path) -> dict[str, str] | None:
    """Versions of trl, transformers and torch in the venv of ``python`` (None when one is missing)."""
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({p: m.version(p) for p in ('trl', 'transformers', 'torch', 'tensorboard')}))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def ensure_trl_venv(venv: Path) -> dict[str, str]:
    """Make the TRL venv when it is missing or incomplete; returns its versions. Raises naming the pip
    command that failed; warns when pip's resolver picked another transformers than the project's."""
    transformers = importlib.metadata.version("transformers")
    python = venv_python(venv)
    versions = installed_versions(python) if python.exists() else None
    if versions is None or versions["trl"] != TRL_VERSION:
        print(f"making the TRL venv {venv} (trl {TRL_VERSION}, transformers {transformers}, torch {TORCH_VERSION})")
        make_venv(
            venv,
            [f"torch=={TORCH_VERSION}"],  # first and pinned: an unpinned torch pulls gigabytes of CUDA
            [f"trl=={TRL_VERSION}", f"transformers=={transformers}", f"torch=={TORCH_VERSION}", "tensorboard"],
        )
        versions = installed_versions(python)
        if versions is None:
            raise RuntimeError(f"the TRL venv {venv} was made but cannot import trl, transformers and torch")
    if versions["transformers"] != transformers:
        print(f"warning: the TRL venv has transformers {versions['transformers']}, the project {transformers}")
    return versions


def ensure_lit_venv(venv: Path) -> Path:
    """Make ``venv`` with lit-gcpo as a user installs it (``pip install -e .``, no extras) when it is missing or
    cannot import lit-gcpo; returns its python."""
    python = venv_python(venv)
    check = [str(python), "-c", "import lit_gcpo.running.cli, tensorboard"]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return python
    print(f"making the lit-gcpo venv {venv} (pip install -e ., torch {TORCH_VERSION})")
    return make_venv(venv, [f"torch=={TORCH_VERSION}"], ["-e", str(ROOT)])


# ---------------------------------------------------------------------------------------------- runs
def run_once(
    framework: str, python: Path, work: Path, beta: float, steps: int, out: Path, omp_wait_policy: str
) -> dict[str, Any]:
    """One training run in its own process; its record (``vs_trl_runner.finish``). Raises with the log's tail
    when the run fails or exceeds its time bound. ``omp_wait_policy`` ``unset``: each framework's own
    (lit-gcpo's CLI sets PASSIVE unless the environment says otherwise; TRL leaves OpenMP's default)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
    )
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    command = [str(python), str(HERE / "vs_trl_runner.py"), framework, str(work), str(beta), str(steps), str(out)]
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        try:
            done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=120 + 15 * steps)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{framework} run (beta {beta}) exceeded {120 + 15 * steps} s; log: {log}") from None
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{framework} run (beta {beta}) failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    record = json.loads(out.read_text())
    # the same work: one optimizer step per rollout of 64 completions, every step timed
    counts = (record["optimizer_steps"], len(record["phases"]), len(record["completion_tokens"]))
    if counts != (steps, steps, steps):
        raise RuntimeError(f"{framework} run (beta {beta}): optimizer steps, timed steps, rollouts {counts} != {steps}")
    return record


def split_of(record: dict[str, Any]) -> dict[str, float]:
    """Per-phase medians (s) over the steps after the warm-up, in common names; ``rest`` is the wall time not
    in a phase (logging, the data loader, callbacks)."""
    walls = record["walls"]  # walls[k]: step k + 2 (1-based), between the ends of steps k + 1 and k + 2
    rows: list[dict[str, float]] = []
    for step in range(WARMUP_STEPS + 1, len(walls) + 2):
        phases, wall = record["phases"][step - 1], walls[step - 2]
        if record["framework"] == "lit":
            row = {k: phases.get(k, 0.0) for k in ("generate", "reward", "score", "train")}
        else:
            rollout = phases.get("_prepare_inputs", 0.0)
            row = {
                "generate": phases.get("transformers.generate", 0.0),
                "reward": phases.get("_calculate_rewards", 0.0),
                "train": phases["until_optimizer_step"] - rollout,
            }
            row["score"] = rollout - row["generate"] - row["reward"]
        row["rest"] = wall - sum(row.values())
        row["step"] = wall
        rows.append(row)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of the per-run medians; peak RSS medians too; mean completion tokens per step."""
    splits = [split_of(r) for r in records]
    summary = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    summary["rss"] = statistics.median(r["peak_rss_mib"] for r in records)
    summary["rss_children"] = statistics.median(r["children_peak_rss_mib"] for r in records)
    summary["tokens"] = statistics.fmean(t for r in records for t in r["completion_tokens"])
    summary["threads"] = records[0]["threads"]
    summary["runs"] = [s["step"] for s in splits]  # type: ignore[assignment]
    return summary


# ------------------------------------------------------------------------------------------- report
PHASE_ROWS = (
    ("generate", "generation"),
    ("reward", "reward"),
    ("score", "scoring pass (lit) / rest of the rollout incl. reference pass (TRL)"),
    ("train", "training: forward, loss, backward, clip, optimizer"),
    ("rest", "rest: logging, data, callbacks"),
    ("step", "whole step (median)"),
)


def venv_name(python: Path) -> str:
    """The venv of ``python`` as the report names it: relative to the repository when inside it."""
    venv = Path(os.path.abspath(python)).parent.parent
    return str(venv.relative_to(ROOT)) if venv.is_relative_to(ROOT) else str(venv)


def report(results: dict[float, dict[str, dict[str, Any]]], args: argparse.Namespace, versions: dict) -> list[str]:
    threads = next(iter(results.values()))["lit"]["threads"]
    lines = [
        "## lit-gcpo against TRL's GRPOTrainer on the same work (`bench_vs_trl.py`)",
        "",
        run_header(threads=threads),
        f"TRL {versions['trl']}, transformers {versions['transformers']} (both venvs), torch {versions['torch']}; "
        f"{args.parameters:,}-parameter random Llama, character tokenizer, {PROMPTS_PER_STEP} prompts x G = "
        f"{GROUP_SIZE} completions of at most {MAX_NEW_TOKENS} tokens per optimizer step, Dr. GRPO, fp32, one "
        "optimizer step per rollout, TensorBoard scalars every step on both sides, OMP_WAIT_POLICY "
        f"{args.omp_wait_policy} on both; lit-gcpo ran with `{venv_name(args.lit_python)}` (settings: the script's "
        f"docstring). {args.repeats} interleaved repeats x {args.steps} steps per beta; per run the median over "
        f"steps {WARMUP_STEPS + 1}-{args.steps}, then the median over repeats.",
        "",
        "| beta | TRL step (s) | lit-gcpo step (s) | lit / TRL | TRL peak RSS (MiB) | lit-gcpo peak RSS (MiB) "
        "| lit / TRL | tokens/step TRL, lit |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for beta, sides in results.items():
        trl, lit = sides["trl"], sides["lit"]
        lit_rss = f"{lit['rss']:.0f} (+{lit['rss_children']:.0f} reward process)"
        lines.append(
            f"| {beta:g} | {trl['step']:.3f} | {lit['step']:.3f} | {lit['step'] / trl['step']:.2f}x "
            f"| {trl['rss']:.0f} | {lit_rss} | {lit['rss'] / trl['rss']:.2f}x "
            f"| {trl['tokens']:.0f}, {lit['tokens']:.0f} |"
        )
    lines.append("")
    for beta, sides in results.items():
        runs = "; ".join(f"{fw} " + ", ".join(f"{m:.3f}" for m in sides[fw]["runs"]) for fw in ("trl", "lit"))
        lines.append(f"Per-run median steps (s) at beta {beta:g}, in repeat order: {runs}.  ")
    lines += ["", "Split of the step (median s over steps and repeats):", ""]
    header = " | ".join(f"TRL b={b:g} | lit b={b:g}" for b in results)
    lines += [f"| phase | {header} |", "| --- |" + " ---: |" * (2 * len(results))]
    for key, label in PHASE_ROWS:
        cells = " | ".join(f"{s['trl'][key]:.3f} | {s['lit'][key]:.3f}" for s in results.values())
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "TRL's split comes from its own profiling timers (`transformers.generate`, `_calculate_rewards`, "
        "`_prepare_inputs`) and the trainer's step/optimizer callbacks; lit-gcpo's from its `time/*` scalars. "
        "Peak RSS is `ru_maxrss` of the training process; lit-gcpo runs a user's reward function in a child "
        "process, whose peak is given in parentheses (TRL calls it in process).",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl")
    parser.add_argument("--lit-venv", type=Path, default=ROOT / ".venv-lit")
    parser.add_argument(
        "--lit-python",
        type=Path,
        default=None,
        help="the python of the venv lit-gcpo runs in (default: --lit-venv's, made as `pip install -e .`)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "unset"],
        help="OMP_WAIT_POLICY of both runs (unset: each framework's own)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (model, runs, logs)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.steps < WARMUP_STEPS + 2:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} are warm-up)")
    versions = ensure_trl_venv(args.trl_venv)
    if args.lit_python is None:
        args.lit_python = ensure_lit_venv(args.lit_venv)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    try:
        files, args.parameters = write_work(work)
        print(f"policy: {args.parameters:,} parameters; work directory {work}")
        pythons = {"trl": venv_python(args.trl_venv), "lit": args.lit_python}
        records: dict[float, dict[str, list[dict[str, Any]]]] = {b: {"trl": [], "lit": []} for b in args.betas}
        for repeat in range(args.repeats):
            order = ("trl", "lit") if repeat % 2 == 0 else ("lit", "trl")
            for beta in args.betas:
                for framework in order:
                    out = work / f"{framework}-beta{beta:g}-r{repeat}.json"
                    python = pythons[framework]
                    record = run_once(framework, python, files.root, beta, args.steps, out, args.omp_wait_policy)
                    records[beta][framework].append(record)
                    print(f"repeat {repeat} beta {beta:g} {framework}: median step {split_of(record)['step']:.3f} s")
        results = {b: {fw: summarise(runs) for fw, runs in sides.items()} for b, sides in records.items()}
        lines = report(results, args, versions)
        if not args.no_write:
            write_results_section("bench_vs_trl", lines)
        print("\n".join(lines))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
