"""Helpers shared by the benchmark scripts.

- ``write_results_section``: replace (or append) one marked section of ``benchmarks/RESULTS.md``.
- ``paired_by_seed``, ``add_paired_arguments``: the closing sentence and the common command-line options of an A/B
  run of the quickstart paired by seed.
- ``resolve_policy``: the path of a policy to load. The alias ``lit-gcpo/tiny-arith`` maps to the shipped
  warm-started asset when it exists; while it does not (it is built separately), a stand-in is made here:
  ``build_tiny_model`` plus a short supervised fine-tuning on worked solutions of the arithmetic task,
  cached under ``benchmarks/.cache`` so that it is trained once. The stand-in is NOT the shipped asset:
  results obtained with it say so (``PolicyInfo.description``).
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "RESULTS.md"
FIGURES = BENCHMARKS / "figures"
CACHE = BENCHMARKS / ".cache"
MACHINE = "2-core CPU, no GPU"


def write_results_section(name: str, lines: list[str], path: Path | None = None) -> None:
    """Replace (or append) the section ``name`` of ``path`` (default ``benchmarks/RESULTS.md``), leaving the
    others alone."""
    path = RESULTS if path is None else path
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def validation_trajectory(validations: list[tuple[int, float]]) -> str:
    """``step: accuracy`` pairs of a run's validation curve, comma-separated (the benchmarks' trajectory column)."""
    return ", ".join(f"{step}: {value:.3f}" for step, value in validations)


def paired_by_seed(contrast: str, accuracy_differences: list[float], time_ratios: list[float]) -> str:
    """``Paired by seed, <contrast>: final accuracy +x, ... points; step time xr, ....`` (differences in [0, 1])."""
    points = ", ".join(f"{100 * difference:+.1f}" for difference in accuracy_differences)
    ratios = ", x".join(f"{ratio:.2f}" for ratio in time_ratios)
    return f"Paired by seed, {contrast}: final accuracy {points} points; step time x{ratios}."


def add_paired_arguments(parser: Any, out: Path, seeds: list[int]) -> None:
    """The options of a paired quickstart benchmark: ``--seeds``, ``--steps``, ``--out``, ``--timeout``,
    ``--collect-only`` and ``--no-write`` (``parser``: an ``argparse.ArgumentParser``)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--steps", type=int, default=100, help="trainer.max_steps of every run")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--collect-only", action="store_true", help="read the runs in --out, train nothing")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")


def run_header(threads: int | None = None) -> str:
    """``date, machine, torch version, threads, load average`` for a results section (``threads``: those of
    the runs when they are other processes; default: this process's)."""
    load = " / ".join(f"{x:.1f}" for x in _load_average())
    threads = torch.get_num_threads() if threads is None else threads
    return (
        f"{dt.date.today().isoformat()}, {MACHINE} ({platform.machine()}), torch {torch.__version__}, "
        f"{threads} torch threads; load average (1/5/15 min) at the end: {load}."
    )


def _load_average() -> tuple[float, float, float]:
    try:
        import os

        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# ------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class PolicyInfo:
    """Where the policy to load lives and how to describe it in a report."""

    path: str
    description: str
    stand_in: bool = False


def resolve_policy(model: str, sft_steps: int = 1200, seed: int = 0) -> PolicyInfo:
    """The loadable path of ``model``; for the tiny alias without its asset, a cached SFT stand-in."""
    from lit_gcpo.assets.tiny_model import TINY_MODEL_NAME, TINY_MODEL_PATH

    if model != TINY_MODEL_NAME:
        return PolicyInfo(model, f"`{model}`")
    if (Path(TINY_MODEL_PATH) / "config.json").is_file():
        return PolicyInfo(TINY_MODEL_PATH, f"`{TINY_MODEL_NAME}` (the shipped warm-started asset)")
    target = CACHE / f"tiny-arith-sft{sft_steps}-seed{seed}"
    if not (target / "config.json").is_file():
        log.warning("the asset %s does not exist yet: training a stand-in at %s", TINY_MODEL_PATH, target)
        sft_tiny_policy(target, steps=sft_steps, seed=seed)
    return PolicyInfo(
        str(target),
        f"stand-in for `{TINY_MODEL_NAME}` (its asset did not exist yet): `build_tiny_model(seed={seed})` "
        f"+ {sft_steps} SFT steps on worked arithmetic solutions (`benchmarks/_common.py`)",
        stand_in=True,
    )


def sft_tiny_policy(target: Path, steps: int, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> float:
    """Train ``build_tiny_model`` on worked solutions (loss on the completion only) and save it with its
    tokenizer to ``target``; returns the final training loss. Under-trained on purpose, like the asset."""
    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_model
    from lit_gcpo.tasks.arithmetic import DEFAULT_MIX, sample_problems

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(seed=seed).train()
    problems = sample_problems(steps * batch_size, DEFAULT_MIX, seed=10_000 + seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, loss = time.perf_counter(), torch.zeros(())
    for step in range(steps):
        chunk = problems[step * batch_size : (step + 1) * batch_size]
        prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in chunk]
        eos = [tokenizer.eos_token_id]
        answers = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] + eos for p in chunk]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, T]
        labels = torch.full_like(ids, -100)  # [b, T]
        attention = torch.zeros_like(ids)  # [b, T]
        for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
            attention[row, : len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 250 == 0:
            seconds = time.perf_counter() - start
            log.warning("stand-in SFT step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), seconds)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return loss.item()
