"""Cost of answer grading: the fast paths, the cache, the grading process against in-process Math-Verify.

    python benchmarks/bench_grading.py

Writes the section ``bench_grading`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import time

from bench_algos import MACHINE, write_results_section
from math_verify import LatexExtractionConfig, parse, verify

from lit_gcpo.rewards import RewardSet
from lit_gcpo.rewards.answers import _equivalent_cached, answers_equivalent
from lit_gcpo.rewards.sandbox import GraderProcess


def _per_call_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(*item)
    return 1000 * (time.perf_counter() - start) / len(items)


def main() -> None:
    logging.disable(logging.WARNING)
    # Distinct pairs that need Math-Verify (fractions of a growing size against decimals / other fractions).
    pairs = [(f"\\frac{{{k}}}{{{2 * k}}}", "0.5" if k % 2 else f"\\frac{{{k + 1}}}{{{2 * k}}}") for k in range(1, 201)]

    start = time.perf_counter()
    cold = GraderProcess()
    cold.grade("1", "1", 2.0)
    startup_s = time.perf_counter() - start
    cold.close()

    config = [LatexExtractionConfig()]

    def in_process(a: str, b: str) -> bool:
        return verify(parse(f"${a}$", extraction_config=config), parse(f"${b}$", extraction_config=config))

    in_process(*pairs[0])  # warm imports
    direct_ms = _per_call_ms(in_process, pairs)

    _equivalent_cached.cache_clear()
    answers_equivalent("\\frac{1}{3}", "0.3333")  # start the grading process
    _equivalent_cached.cache_clear()
    process_ms = _per_call_ms(answers_equivalent, pairs)
    cached_ms = _per_call_ms(answers_equivalent, pairs)
    fast = [("80", "080"), ("5", "6"), ("\\frac{1}{2}", "\\frac{1}{2}"), ("1,234", "1234")] * 250
    fast_ms = _per_call_ms(answers_equivalent, fast)

    # A batch like a training step: 64 completions, a quarter right, half wrong numbers, a quarter unboxed.
    rows = [{"answer": "\\frac{7}{2}"}] * 64
    completions = []
    for i in range(64):
        if i % 4 == 0:
            completions.append(f"Work {i} ... so the answer is $\\boxed{{3.5}}$.")
        elif i % 4 == 3:
            completions.append(f"Work {i} ... I am not sure.")
        else:
            completions.append(f"Work {i} ... $\\boxed{{\\frac{{{i}}}{{2}}}}$")
    rewards = RewardSet.from_names(["math_accuracy", "format"])
    _equivalent_cached.cache_clear()
    batch_times = []
    for _ in range(3):
        _equivalent_cached.cache_clear()
        start = time.perf_counter()
        rewards.score(["q"] * 64, completions, rows)
        batch_times.append(time.perf_counter() - start)
    batch_ms = 1000 * statistics.median(batch_times)

    lines = [
        "## Answer grading (bench_grading.py)",
        "",
        f"{dt.date.today().isoformat()}, {MACHINE} (shared with other jobs: absolute times are noisy).",
        "Math-Verify (LaTeX extraction only) per comparison; 200 distinct fraction/decimal pairs.",
        "",
        "| path | time per comparison | ratio to in-process |",
        "|---|---|---|",
        f"| in-process `parse` + `verify` (main thread only) | {direct_ms:.2f} ms | 1.0x |",
        f"| `answers_equivalent`, grading process, uncached | {process_ms:.2f} ms | {process_ms / direct_ms:.2f}x |",
        f"| `answers_equivalent`, cache hit | {1000 * cached_ms:.1f} us | {cached_ms / direct_ms:.4f}x |",
        f"| `answers_equivalent`, fast path (same string / integers) | {1000 * fast_ms:.1f} us "
        f"| {fast_ms / direct_ms:.4f}x |",
        "",
        f"Grading-process start (interpreter + Math-Verify import, paid once and after each kill): {startup_s:.2f} s.",
        f"`RewardSet(math_accuracy, format).score` on 64 completions (cold cache): {batch_ms:.0f} ms.",
    ]
    print("\n".join(lines))
    write_results_section("bench_grading", lines)


if __name__ == "__main__":
    main()
