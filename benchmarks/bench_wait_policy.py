"""What ``OMP_WAIT_POLICY`` costs and gains lit-gcpo, per rollout engine, on a quiet and on a loaded machine.

    .venv/bin/python benchmarks/bench_wait_policy.py [--engines hf vllm] [--repeats 2] [--steps 12] [--allow-busy]

lit-gcpo alone (``vs_trl_runner.py lit``) on the tiny work of ``bench_vs_trl.py`` (``vs_trl_work.py``: 354k
parameters, 8 prompts x 8 completions of at most 32 tokens, Dr. GRPO, beta 0), with ``data.engine`` ``hf`` (in
``.venv-lit``, as ``bench_vs_trl.py`` makes it) or ``vllm`` (in ``.venv-vllm``, ``scripts/setup_vllm_cpu.sh``; fp32,
``max_model_len`` 256; left out when that venv is missing), in six environments: ``OMP_WAIT_POLICY`` not set (the
CLI decides: ``lit_gcpo.running.wait_policy``), ``ACTIVE`` or ``PASSIVE``, each on the machine as it is and with
``bench_vs_trl``'s background load (one busy loop per core). Per run: median step time and CPU time per step after
3 warm-up steps, the policy the process ran under, the foreign CPU share; the rows go to ``benchmarks/RESULTS.md``
(section ``wait_policy``) under the same quiet/loaded rule as ``bench_vs_trl.py`` (``--allow-busy``: section
``wait_policy_busy``, labelled). This is the measurement behind the CLI's rule.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from _common import run_header, write_results_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_vs_trl import ensure_lit_venv, run_once  # noqa: E402
from vs_trl_env import BackgroundLoad, Environment, refused_runs  # noqa: E402
from vs_trl_report import split_of  # noqa: E402
from vs_trl_work import TINY, write_work  # noqa: E402

POLICIES = (None, "ACTIVE", "PASSIVE")


def environments() -> dict[str, Environment]:
    """The six environments, by label: the wait policy (None: the CLI decides), quiet or loaded."""
    table = {}
    for loaded in (False, True):
        for policy in POLICIES:
            label = f"{policy or 'CLI default'}{', loaded' if loaded else ''}"
            table[label] = Environment(label, {"trl": policy, "lit": policy}, loaded=loaded)
    return table


def measure(args: argparse.Namespace, pythons: dict[str, Path], work: Path) -> list[dict]:
    files, _ = write_work(work / "tiny", TINY)
    table, records = environments(), []
    for repeat in range(args.repeats):
        for engine in args.engines:
            for label, environment in table.items():
                run = {"size": "tiny", "repeat": repeat, "environment": label, "beta": 0.0, "framework": "lit"}
                run.update(engine=engine, environment_spec=environment)
                out = work / f"{engine}-{label.replace(', ', '-').replace(' ', '_')}-r{repeat}.json"
                load = BackgroundLoad(os.cpu_count() or 1) if environment.loaded else contextlib.nullcontext()
                with load:
                    record = run_once(pythons[engine], files.root, run, TINY, args.steps, out)
                record.pop("environment_spec")
                records.append(record)
                step = split_of(record, TINY.warmup_steps)
                print(
                    f"{engine} {label} r{repeat}: step {step['step']:.3f} s, CPU {step['cpu']:.3f} s, "
                    f"policy {record['omp_wait_policy']}, foreign {record['foreign_share']:.2f}",
                    flush=True,
                )
    return records


def report(records: list[dict], args: argparse.Namespace, refusals: list[str]) -> list[str]:
    lines = ["## OMP_WAIT_POLICY per engine, quiet and loaded (`bench_wait_policy.py`)", ""]
    if refusals:
        lines += ["**Measured on a busy machine: not the quiet comparison.** " + "; ".join(refusals), ""]
    lines += [
        run_header(threads=records[0]["threads"]),
        f"lit-gcpo alone on the tiny work of `bench_vs_trl.py`, {args.repeats} interleaved repeats x {args.steps} "
        "steps; median over repeats of the per-run medians (steps 4 on). `CLI default`: no OMP_WAIT_POLICY in the "
        "environment, the CLI decides (the policy it chose is given).",
        "",
        "| engine | environment | step (s) | CPU s/step | policy the run had | foreign CPU share (max) |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for engine in args.engines:
        for label in environments():
            runs = [r for r in records if (r["engine"], r["environment"]) == (engine, label)]
            splits = [split_of(r, TINY.warmup_steps) for r in runs]
            step = statistics.median(s["step"] for s in splits)
            cpu = statistics.median(s["cpu"] for s in splits)
            policies = ", ".join(sorted({r["omp_wait_policy"] for r in runs}))
            foreign = max(r["foreign_share"] for r in runs)
            lines.append(f"| {engine} | {label} | {step:.3f} | {cpu:.3f} | {policies} | {foreign:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lit-venv", type=Path, default=ROOT / ".venv-lit")
    parser.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm")
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < TINY.warmup_steps + 2:
        parser.error(f"--steps must be at least {TINY.warmup_steps + 2}")
    pythons = {"hf": ensure_lit_venv(args.lit_venv), "vllm": args.vllm_venv / "bin" / "python"}
    if "vllm" in args.engines and not pythons["vllm"].exists():
        print(f"no vLLM venv at {args.vllm_venv} (scripts/setup_vllm_cpu.sh makes it): vllm left out")
        args.engines = [e for e in args.engines if e != "vllm"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the background load
    work = Path(tempfile.mkdtemp(prefix="bench_wait_policy_"))
    try:
        records = measure(args, pythons, work)
        refusals = refused_runs(records, environments())
        lines = report(records, args, refusals)
        print("\n".join(lines))
        if args.no_write:
            return 0
        if refusals and not args.allow_busy:
            print("RESULTS.md left as it was:\n" + "\n".join(refusals))
            return 3
        write_results_section("wait_policy_busy" if refusals else "wait_policy", lines)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
