"""lit-gcpo against TRL's ``GRPOTrainer`` on the same work, side by side, in labelled environments: median step
time, its split, peak RSS, and whether the machine was quiet.

    .venv/bin/python benchmarks/bench_vs_trl.py [--sizes tiny 20m] [--environments as-a-user ACTIVE PASSIVE loaded]
        [--same-length] [--repeats N] [--steps N] [--betas 0] [--lit-python PATH] [--allow-busy] [--keep] [--no-write]

The comparison RESULTS.md quotes, on a quiet machine (about 20 minutes on 2 cores): ``.venv/bin/python
benchmarks/bench_vs_trl.py`` with its defaults. ``--same-length`` adds the environment ``same-length`` (estimated 5
minutes more): ``as-a-user`` with every completion exactly the size's most new tokens on both sides (lit-gcpo
``data.sampling.min_tokens``, TRL ``generation_kwargs={"min_new_tokens": N}``), its own labelled row, a control
for equal work (the other rows' completion lengths fall where each sampler's draws put the EOS). Its runs must
show 8 x 8 x N completion tokens at every step on both sides: otherwise the script names them, writes nothing and
exits with status 4.

Venvs. TRL 1.16.0 lives in its own venv, ``.venv-trl`` (ignored by git), which the script makes when it is
missing: ``python -m venv``, ``pip install torch==2.13.0`` (the local CPU wheel), then ``trl==1.16.0``, the
project's own ``transformers`` version (read from this venv) and ``tensorboard``. lit-gcpo runs in ``.venv-lit``
(``pip install -e .``, no extras; made the same way) unless ``--lit-python`` names another venv's python. Each
framework runs as a user installs it and nothing else: the project's ``.venv`` holds the dev extras
(scikit-learn, matplotlib), which transformers and torchmetrics import whenever they are installed (+130 MiB
of RSS measured), and TRL's venv has none of them (a venv whose ``.pth`` reaches into ``.venv``, such as one
made by hand in /tmp, is not equal footing).

Runs. Each run is its own process (``vs_trl_runner.py``): TRL with the TRL venv's python, lit-gcpo with
``lit_gcpo.running.cli.main`` (the ``lit-gcpo`` command) plus a timing callback. Interleaved: per size, per
repeat, the environments in turn (their order rotating with the repeat), per beta TRL and lit-gcpo (the order
alternating with the repeat). Environments, the background load and the quiet check: ``vs_trl_env.py``.

The work (``vs_trl_work.py``), identical on both sides, in two sizes (``--sizes``):

- ``tiny``: a random ``LlamaForCausalLM``, hidden 128, 2 layers, 4 heads, MLP 256, 353,664 parameters, at most 32
  new tokens (per-token overhead dominates); ``20m``: hidden 512, 6 layers, 8 heads, MLP 1536, 20,555,264
  parameters, at most 128 new tokens (compute dominates). Both: untied embeddings, 99-token character tokenizer
  (``PreTrainedTokenizerFast``: pad/bos/eos/unk and the 95 printable ASCII characters; no BOS added), float32,
  dropout 0 (and disabled by both), saved once with ``save_pretrained`` to a temporary directory both load;
- prompts: the 400 "What is A+B? Answer:" (A, B in [0, 19]) from one JSONL file (lit-gcpo:
  ``LocalFiles``, ``template: "{prompt}"``, ``chat: never``; TRL: ``datasets.load_dataset("json")``);
- reward: ``vs_trl_work.sum_reward``, 1 when the completion contains the sum as a whole number (lit-gcpo
  loads it by dotted path and, as for every user function, calls it in a child process; TRL in process);
- per optimizer step: 8 prompts x G = 8 completions, temperature 1, top-p 1, no top-k, sampled by
  ``model.generate`` (TRL) / the ``hf`` engine (lit-gcpo);
- loss: Dr. GRPO: advantages centred on the group mean without std scaling (lit-gcpo ``advantage:
  dr_grpo``; TRL ``scale_rewards="none"``), token losses summed and divided by completions x the most new
  tokens (lit-gcpo ``loss_aggregation: seq_mean_token_sum_norm``; TRL ``loss_type="dr_grpo"``), clip 0.2;
  beta 0 by default (``--betas 0 0.04`` adds the k3 KL term; TRL ``use_bias_correction_kl=False``);
- one optimizer step per rollout (lit-gcpo ``num_iterations: 1``, one micro-batch; TRL
  ``num_iterations=1``, ``per_device_train_batch_size=64``, ``steps_per_generation=1``,
  ``gradient_accumulation_steps=1``), AdamW (``torch.optim.AdamW``; TRL ``optim="adamw_torch"``) lr 1e-5, no
  weight decay, constant schedule without warm-up, gradient-norm clip 1.0, fp32 (TRL ``bf16=False``), no
  gradient checkpointing (TRL defaults to it), seed 0;
- logging: every step, TensorBoard scalars on both sides (lit-gcpo ``TensorBoardLogger``; TRL
  ``report_to="tensorboard"``, ``log_completions=False``); no progress bar; no validation; no checkpoints
  (lit-gcpo ``trainer.enable_checkpointing false``, ``model.export_dir null``; TRL ``save_strategy="no"``);
  no uncertainty callback. lit-gcpo's other options are its defaults;
- CPU, torch threads left at their default (both report it).

Measured per run: the wall time and the process's CPU time of each optimizer step (between consecutive step
ends, logging included), medians over the steps after the size's warm-up steps (tiny 3, 20m 1); the split of
lit-gcpo's step from its logged ``time/*`` scalars and of TRL's from its own profiling timers (see
``vs_trl_runner.py``); completion tokens per step (both must sample the same amount of work); peak RSS
(``ru_maxrss``) of the training process, and of the child processes it still has at the end (lit-gcpo's reward
process); the 1-minute load average before and after, and the foreign CPU share during the run. Reported per
size, environment and beta: the median over repeats of the per-run medians, and the ratios lit-gcpo / TRL.

Written to ``benchmarks/RESULTS.md`` (section ``bench_vs_trl``) only when every quiet run was quiet and every
loaded run was loaded (``vs_trl_env.refused_runs``); otherwise the script names the runs, writes nothing and
exits with status 3. ``--allow-busy`` writes such a measurement to its own section, ``bench_vs_trl_busy``,
labelled as taken on a busy machine (the quiet comparison stays as it was). A run of fewer sizes or environments
writes its own section (``results_section``): ``--sizes 20m --environments same-length`` the control alone to
``bench_vs_trl_same_length``, another subset to ``bench_vs_trl_partial``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import write_results_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from vs_trl_env import (  # noqa: E402
    ENVIRONMENTS,
    BackgroundLoad,
    Environment,
    foreign_share,
    read_proc_stat,
    refused_runs,
    run_environment,
)
from vs_trl_report import report, split_of, summarise, unequal_lengths  # noqa: E402
from vs_trl_work import SIZES, Size, write_work  # noqa: E402

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
DEFAULT_STEPS = {"tiny": 20, "20m": 4}  # with DEFAULT_REPEATS: ~20 minutes for every environment and both sizes
DEFAULT_REPEATS = {"tiny": 2, "20m": 1}
SAME_LENGTH = "same-length"
DEFAULT_ENVIRONMENTS = [name for name, environment in ENVIRONMENTS.items() if not environment.same_length]


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
def wait_with_rusage(process: subprocess.Popen, timeout_s: float) -> tuple[int, float] | None:
    """Wait for ``process``; ``(exit status, its CPU seconds: user + sys, its reaped children's included)``, or
    None when it ran past ``timeout_s`` (then it is killed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return None
        time.sleep(0.05)


def environment_of(run: dict[str, Any]) -> Environment:
    """The environment ``run`` is made in: its own ``environment_spec`` (``bench_wait_policy.py``) or the named one."""
    return run.get("environment_spec") or ENVIRONMENTS[run["environment"]]


def min_tokens_of(run: dict[str, Any], size: Size) -> int:
    """The least completion length of ``run``: the size's most new tokens in a ``same_length`` environment, else 0."""
    return size.max_new_tokens if environment_of(run).same_length else 0


def runner_command(python: Path, work: Path, run: dict[str, Any], size: Size, steps: int, out: Path) -> list[str]:
    """The ``vs_trl_runner.py`` command of ``run`` (``--min-tokens``: :func:`min_tokens_of`)."""
    min_tokens = min_tokens_of(run, size)
    command = [str(python), str(HERE / "vs_trl_runner.py"), run["framework"], str(work), str(run["beta"]), str(steps)]
    return [*command, str(size.max_new_tokens), str(out), run.get("engine", "hf"), "--min-tokens", str(min_tokens)]


def run_once(python: Path, work: Path, run: dict[str, Any], size: Size, steps: int, out: Path) -> dict[str, Any]:
    """One training run in its own process, in ``run['environment']``; its record (``vs_trl_runner.finish``) with
    the wall time, CPU time, load average before and after and foreign CPU share added. Raises with the log's
    tail when the run fails or exceeds its time bound."""
    framework = run["framework"]
    base = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = run_environment(base, environment_of(run), framework)
    command = runner_command(python, work, run, size, steps, out)
    bound = 180 + 60 * steps * (size.max_new_tokens // 32) ** 2
    log = out.with_suffix(".log")
    load_before = os.getloadavg()[0]
    with open(log, "w") as handle:
        stat_before, start = read_proc_stat(), time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        waited = wait_with_rusage(process, bound)
        wall, stat_after = time.perf_counter() - start, read_proc_stat()
    if waited is None:
        raise RuntimeError(f"{framework} run {run} exceeded {bound} s; log: {log}")
    code, own_cpu = waited
    if code != 0 or not out.exists():
        raise RuntimeError(f"{framework} run {run} failed ({code}):\n{log.read_text()[-3000:]}")
    record = json.loads(out.read_text())
    counts = (record["optimizer_steps"], len(record["phases"]), len(record["completion_tokens"]))
    if counts != (steps, steps, steps):  # the same work: one optimizer step per rollout, every step timed
        raise RuntimeError(f"{framework} run {run}: optimizer steps, timed steps, rollouts {counts} != {steps}")
    share = foreign_share(stat_before, stat_after, own_cpu, wall, os.cpu_count() or 1, os.sysconf("SC_CLK_TCK"))
    record.update(run, wall_s=wall, own_cpu_s=own_cpu, foreign_share=share, load_before=load_before)
    record["min_tokens"] = min_tokens_of(run, size)
    record["load_after"] = os.getloadavg()[0]
    return record


def plan(sizes: list[str], environments: list[str], betas: list[float], repeats: dict[str, int]) -> list[dict]:
    """The runs in the order they are made: per size and repeat, the environments rotated by the repeat, per
    beta TRL then lit-gcpo (lit-gcpo first on odd repeats)."""
    runs = []
    for size in sizes:
        for repeat in range(repeats[size]):
            shift = repeat % len(environments)
            for environment in environments[shift:] + environments[:shift]:
                for beta in betas:
                    for framework in ("trl", "lit") if repeat % 2 == 0 else ("lit", "trl"):
                        runs.append(
                            dict(size=size, repeat=repeat, environment=environment, beta=beta, framework=framework)
                        )
    return runs


def measure(args: argparse.Namespace, pythons: dict[str, Path], work_root: Path) -> tuple[list[dict], dict]:
    """Make every run of the plan; the records and each size's parameter count."""
    runs = plan(args.sizes, args.environments, args.betas, args.repeats)
    parameters, files = {}, {}
    for size in args.sizes:
        files[size], parameters[size] = write_work(work_root / size, SIZES[size])
    records = []
    for index, run in enumerate(runs):
        size = SIZES[run["size"]]
        name = f"{run['size']}-{run['environment']}-beta{run['beta']:g}-{run['framework']}-r{run['repeat']}.json"
        python = pythons[run["framework"]]
        loaded = ENVIRONMENTS[run["environment"]].loaded
        with BackgroundLoad(os.cpu_count() or 1) if loaded else contextlib.nullcontext():
            record = run_once(python, files[run["size"]].root, run, size, args.steps[run["size"]], work_root / name)
        records.append(record)
        step = split_of(record, size.warmup_steps)["step"]
        print(
            f"[{index + 1}/{len(runs)}] {name[:-5]}: median step {step:.3f} s, foreign share "
            f"{record['foreign_share']:.2f}, load {record['load_before']:.1f} -> {record['load_after']:.1f}",
            flush=True,
        )
    return records, parameters


def per_size(value: list[str] | None, default: dict[str, int], sizes: list[str], option: str) -> dict[str, int]:
    """``--steps`` / ``--repeats``: one number for every size, or ``size=N`` items; the defaults otherwise."""
    result = {size: default[size] for size in sizes}
    for item in value or []:
        name, _, number = item.rpartition("=")
        if not number.isdigit() or (name and name not in SIZES):
            raise SystemExit(f"{option} {item!r}: give N or SIZE=N with SIZE one of {sorted(SIZES)}")
        for size in [name] if name else sizes:
            result[size] = int(number)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "20m"])
    parser.add_argument("--environments", nargs="+", choices=list(ENVIRONMENTS), default=DEFAULT_ENVIRONMENTS)
    parser.add_argument(
        "--same-length", action="store_true", help="add the same-length control (every completion max_new_tokens)"
    )
    parser.add_argument("--repeats", nargs="+", help=f"N or SIZE=N (default {DEFAULT_REPEATS})")
    parser.add_argument("--steps", nargs="+", help=f"N or SIZE=N (default {DEFAULT_STEPS})")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0])
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl")
    parser.add_argument("--lit-venv", type=Path, default=ROOT / ".venv-lit")
    parser.add_argument("--lit-python", type=Path, default=None, help="the python of the venv lit-gcpo runs in")
    parser.add_argument("--allow-busy", action="store_true", help="write a busy machine's measurement, labelled")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (models, runs, logs)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.same_length and SAME_LENGTH not in args.environments:
        args.environments = [*args.environments, SAME_LENGTH]
    args.steps = per_size(args.steps, DEFAULT_STEPS, args.sizes, "--steps")
    args.repeats = per_size(args.repeats, DEFAULT_REPEATS, args.sizes, "--repeats")
    for size in args.sizes:
        if args.steps[size] < SIZES[size].warmup_steps + 2:
            parser.error(f"--steps for {size} must be at least {SIZES[size].warmup_steps + 2} (warm-up + 2)")
    return args


def results_section(sizes: list[str], environments: list[str], busy: bool) -> str:
    """The RESULTS.md section a run writes: ``bench_vs_trl`` only for the full comparison (both sizes, every default
    environment, the same-length control optional), so that a partial run cannot replace it; the same-length control
    run alone ``bench_vs_trl_same_length``; any other subset ``bench_vs_trl_partial``; a busy machine's measurement
    ``bench_vs_trl_busy`` whatever it covers."""
    if busy:
        return "bench_vs_trl_busy"
    if sorted(sizes) == sorted(SIZES) and set(DEFAULT_ENVIRONMENTS) <= set(environments):
        return "bench_vs_trl"
    return "bench_vs_trl_same_length" if environments == [SAME_LENGTH] else "bench_vs_trl_partial"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C: the background load is stopped and the work directory removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    versions = ensure_trl_venv(args.trl_venv)
    if args.lit_python is None:
        args.lit_python = ensure_lit_venv(args.lit_venv)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    try:
        pythons = {"trl": venv_python(args.trl_venv), "lit": args.lit_python}
        records, args.parameters = measure(args, pythons, work)
        results = summarise(records, args.sizes, args.environments, args.betas)
        refusals = refused_runs(records, ENVIRONMENTS)
        lines = report(results, records, args, versions, refusals)
        print("\n".join(lines))
        if refusals:
            print("\n".join(["not a quiet (or not a loaded) measurement:", *refusals]))
        unequal = unequal_lengths(records, ENVIRONMENTS)
        if unequal:  # the control failed: its row would compare unequal work under a label that says otherwise
            print("\n".join(["RESULTS.md left as it was: the same-length runs did not generate equal work:", *unequal]))
            return 4
        if args.no_write:
            return 0
        if refusals and not args.allow_busy:
            print("RESULTS.md left as it was (--allow-busy writes it to the section bench_vs_trl_busy, labelled)")
            return 3
        write_results_section(results_section(args.sizes, args.environments, bool(refusals)), lines)
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
