"""Peak memory and time of chunked sampled-token log-probs vs a full log_softmax (forward + backward).

Qwen2.5-0.5B's head: vocab V = 151,936, hidden H = 896; N = 8 sequences. Each variant runs in a fresh
subprocess and reports its peak-RSS increase (``resource.getrusage`` max RSS after the step minus the
RSS once the inputs exist): the CPU allocator returns large blocks to the OS, so this is the step's
peak extra memory. Both variants include the unavoidable fp32 gradient of the [V, H] head (545 MB).

The full variant materialises [N*T, V] float32 logits, their log_softmax and their gradients: at
T = 1024 that is ~5 GB per buffer and well over 15 GB in all, too much for a 24 GiB machine shared with
other jobs, so it is measured at T = 128 and 256 (memory grows linearly in T) and the chunked path at
T = 128 and 1024. The chunked backward recomputes the logits, so it costs 4 head matmuls per chunk
instead of 3: expect it ~1.3x slower than the full path when both fit. ``auto`` is what the module runs:
``token_logprobs`` with its defaults, which takes the plain path when one chunk holds every token (here
N * T = 1024 = chunk_size at T = 128); ``chunked`` forces the chunked function (4 chunks of 256 at T = 128).

    python benchmarks/bench_logprobs.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

N, H, V = 8, 896, 151_936
CHUNK = 1024
RUNS = [
    ("full", 128),
    ("full", 256),
    ("auto", 128),
    ("chunked", 128),
    ("chunked+entropy", 128),
    ("chunked", 1024),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run_variant(variant: str, length: int) -> dict[str, float]:
    """One forward + backward in this process; returns time and peak extra memory."""
    from lit_gcpo.algorithms.logprobs import token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(N, length, H, requires_grad=True)  # [N, T, H]
    weight = (torch.randn(V, H) * 0.02).requires_grad_()  # [V, H]
    targets = torch.randint(0, V, (N, length))  # [N, T]
    base_mb = _rss_mb()
    start = time.perf_counter()
    if variant == "full":
        logits = hidden @ weight.T  # [N, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = None
    elif variant == "auto":
        logp, entropy = token_logprobs(hidden, weight, targets, chunk_size=CHUNK)
    else:
        logp, entropy = token_logprobs(
            hidden,
            weight,
            targets,
            chunk_size=min(CHUNK, N * length // 4),
            with_entropy=variant.endswith("entropy"),
            max_plain_elements=0,
        )
    loss = logp.sum() + (entropy.sum() if entropy is not None else 0.0)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "peak_extra_mb": peak_mb - base_mb, "logp_sum": float(logp.sum())}


def main() -> None:
    script = Path(__file__).resolve()
    rows = []
    for variant, length in RUNS:
        out = subprocess.run(
            [sys.executable, str(script), "--child", variant, str(length)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(f"{variant} T={length} failed:\n{out.stderr}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((variant, length, result))
        print(f"{variant:16s} T={length:5d}: {result['seconds']:7.2f} s, peak +{result['peak_extra_mb']:8.0f} MB")
    by_key = {(v, t): r for v, t, r in rows}
    a, b = by_key[("full", 128)]["logp_sum"], by_key[("chunked", 128)]["logp_sum"]
    assert abs(a - b) <= 1e-5 * abs(a), ("full and chunked log-probs differ", a, b)

    sys.path.insert(0, str(script.parent))
    from _common import MACHINE, write_results_section

    full_128, full_256 = by_key[("full", 128)]["peak_extra_mb"], by_key[("full", 256)]["peak_extra_mb"]
    slope_mb = (full_256 - full_128) / 128  # per position of T
    full_1024_gb = (full_128 + slope_mb * (1024 - 128)) / 1024
    lines = [
        "## Chunked log-probs (bench_logprobs.py)",
        "",
        f"{dt.date.today().isoformat()}, {MACHINE}, torch {torch.__version__} ({torch.get_num_threads()} threads)."
        " Forward + backward of the",
        f"sampled-token log-probs through a [V={V:,}, H={H}] float32 head, N = {N}; `auto`: `token_logprobs` with",
        f"chunk_size = {CHUNK} (one chunk at T = 128: the plain path), `chunked`: the chunked function forced",
        f"(chunks of min({CHUNK}, N T / 4) tokens);",
        "one run each in a fresh process; memory = peak RSS increase over the inputs (includes the",
        "545 MB gradient of the head weight). `full` = `log_softmax(hidden @ W.T).gather`.",
        f"Load average when done: {os.getloadavg()[0]:.1f} (other jobs share the 2 cores: times are noisy).",
        "",
        "| variant | T | time | peak extra memory |",
        "|---|---|---|---|",
        *[f"| {v} | {t} | {r['seconds']:.2f} s | {r['peak_extra_mb']:,.0f} MB |" for v, t, r in rows],
        "",
        f"`full` at T = 1024 was not run: its memory grows ~{slope_mb:.1f} MB per position of T at N = {N},",
        f"extrapolating to ~{full_1024_gb:.0f} GB at T = 1024, more than this shared 24 GiB machine can give.",
        "The chunked path's extra memory does not grow with T beyond the [N*T] outputs and the [N, T, H]",
        "hidden gradient.",
    ]
    write_results_section("bench_logprobs", lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_run_variant(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
