"""Wall time of the README's evaluation command on the benchmark sample records, fresh and resumed.

    python benchmarks/bench_eval.py [--repeats 2]

Runs ``lit-gcpo test --config configs/eval_samples.yaml`` (the embedded tiny policy, all nine benchmarks,
greedy and sampled) as a subprocess into a temporary output directory, ``repeats`` times from scratch,
then once more into the last directory (every batch is in its progress file: a resumed run that has
nothing left to generate). Times include the interpreter start and the imports, as a user sees them.
Writes the section ``bench_eval`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import run_header, write_results_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/eval_samples.yaml"


def _run(out: Path) -> float:
    command = [
        sys.executable,
        "-c",
        "import sys; from lit_gcpo.running.cli import main; main(sys.argv[1:])",
        "test",
        "--config",
        CONFIG,
        f"--trainer.callbacks.output_dir={out}",
        f"--trainer.default_root_dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = []
        for repeat in range(args.repeats):
            out = Path(tmp) / f"run{repeat}"
            fresh.append(_run(out))
        resumed = _run(out)
        document = json.loads((out / "test_benchmarks.json").read_text())
        paper = (out / "test_paper.md").read_text()
    summary = document["summary"]
    items = sum(int(values["items"]) for values in summary.values())
    completions = sum(len(item["completions"]) for item in document["items"])
    lines = [
        "## Evaluation on the sample records (bench_eval.py)",
        "",
        run_header(),
        f"`lit-gcpo test --config {CONFIG}`: the tiny policy ({document['label']}), nine benchmarks, greedy",
        f"and sampled: {len(summary)} benchmark passes, {items} prompts, {completions} completions.",
        "",
        "| run | wall time (s) |",
        "|---|---|",
        *(f"| from scratch, run {i + 1} | {t:.1f} |" for i, t in enumerate(fresh)),
        f"| resumed with every batch done (reads the progress file, generates nothing) | {resumed:.1f} |",
        "",
        f"Median from scratch: {statistics.median(fresh):.1f} s. The paper table it prints:",
        "",
        paper.strip(),
    ]
    write_results_section("bench_eval", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
