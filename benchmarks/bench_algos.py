"""Speed of the pure algorithm functions against plain Python-loop references.

Each benchmark is a section: a function returning the markdown lines it writes to
``benchmarks/RESULTS.md`` (under its own heading, replaced on every run). Add a section by writing
``bench_<name>() -> list[str]`` and listing it in ``SECTIONS``.

    python benchmarks/bench_algos.py            # every section
    python benchmarks/bench_algos.py loss       # one section
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import MACHINE, write_results_section

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.losses import grpo_loss


def time_it(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- loss


def _loss_inputs(num_groups: int, group_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * group_size
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    return {
        "rewards": torch.randint(0, 2, (n,), generator=gen).float(),  # [N] binary, as math rewards
        "group_ids": torch.arange(num_groups).repeat_interleave(group_size),  # [N]
        "logp": -torch.rand(n, length, generator=gen) * 3,  # [N, L]
        "old": -torch.rand(n, length, generator=gen) * 3,  # [N, L]
        "ref": -torch.rand(n, length, generator=gen) * 3,  # [N, L]
        "mask": (torch.arange(length) < lengths[:, None]).float(),  # [N, L]
    }


def _loss_vectorised(x: dict[str, torch.Tensor], num_groups: int, beta: float) -> torch.Tensor:
    logp = x["logp"].clone().requires_grad_()
    adv, _ = group_advantages(x["rewards"], x["group_ids"], num_groups)
    loss, _ = grpo_loss(logp, x["old"], adv, x["mask"], ref_logp=x["ref"], beta=beta)
    loss.backward()
    return loss.detach()


def _loss_loop(x: dict[str, torch.Tensor], num_groups: int, beta: float) -> torch.Tensor:
    """Per-group advantages and per-sequence losses, one Python iteration each (the reference)."""
    logp_all = x["logp"].clone().requires_grad_()
    rewards, group_ids = x["rewards"].tolist(), x["group_ids"].tolist()
    adv = [0.0] * len(rewards)
    for g in range(num_groups):
        idx = [i for i, gi in enumerate(group_ids) if gi == g]
        vals = [rewards[i] for i in idx]
        if max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        for i in idx:
            adv[i] = (rewards[i] - mean) / (std + 1e-4)
    total, tokens = 0.0, 0.0
    for i in range(len(rewards)):
        n_i = int(x["mask"][i].sum())
        logp, old, ref = logp_all[i, :n_i], x["old"][i, :n_i], x["ref"][i, :n_i]
        ratio = (logp - old).exp()
        pg = torch.maximum(-ratio * adv[i], -ratio.clamp(0.8, 1.2) * adv[i])
        kl = (ref - logp).exp() - (ref - logp) - 1
        total = total + (pg + beta * kl).sum()
        tokens += n_i
    loss = total / tokens
    loss.backward()
    return loss.detach()


def bench_loss() -> list[str]:
    """GRPO loss (advantages + clipped policy loss + k3 KL + token_mean), forward and backward."""
    num_groups, group_size, length, beta = 128, 8, 1024, 0.04
    x = _loss_inputs(num_groups, group_size, length)
    vec = _loss_vectorised(x, num_groups, beta)
    ref = _loss_loop(x, num_groups, beta)
    torch.testing.assert_close(vec, ref, rtol=1e-5, atol=1e-6)
    t_vec = time_it(lambda: _loss_vectorised(x, num_groups, beta), repeats=5)
    t_loop = time_it(lambda: _loss_loop(x, num_groups, beta), repeats=3)
    n = num_groups * group_size
    print(f"loss: vectorised {t_vec * 1e3:.1f} ms, loop {t_loop * 1e3:.1f} ms, speed-up {t_loop / t_vec:.1f}x")
    return [
        "## Loss (bench_algos.py loss)",
        "",
        f"{dt.date.today().isoformat()}, {MACHINE}, torch {torch.__version__}, threads: {torch.get_num_threads()}.",
        f"GRPO loss for B*G = {n} completions ({num_groups} groups of {group_size}) x L = {length} tokens:",
        "group advantages + clipped policy loss + beta * k3 KL + token_mean, forward + backward w.r.t. logp.",
        f"Both give the same loss (checked to 1e-5). Load average when done: {os.getloadavg()[0]:.1f}.",
        "",
        "| implementation | median time | ratio |",
        "|---|---|---|",
        f"| vectorised (`group_advantages` + `grpo_loss`) | {t_vec * 1e3:.1f} ms | 1.0x |",
        f"| per-group / per-sequence Python loop | {t_loop * 1e3:.1f} ms | {t_loop / t_vec:.1f}x slower |",
    ]


SECTIONS: dict[str, Callable[[], list[str]]] = {"loss": bench_loss}


def main(names: list[str]) -> None:
    # One thread: the 2 cores are shared with other jobs, and under load two OpenMP threads contend so
    # much that timings vary 10-20x between runs; one thread keeps the ratios meaningful.
    torch.set_num_threads(1)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    for name in names or list(SECTIONS):
        write_results_section(f"bench_algos.{name}", SECTIONS[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
