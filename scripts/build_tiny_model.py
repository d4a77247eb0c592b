"""Regenerate the shipped warm-started policy ``lit_gcpo/assets/tiny-arith`` (``lit-gcpo/tiny-arith``).

Recipe: a random ``build_tiny_config()`` Llama (seed 0) fine-tuned on worked solutions of arithmetic problems
drawn with ``WARM_START_MIX`` (harder than the RL ``DEFAULT_MIX``) from a stream of its own (seed 1000; the
train and validation splits of seed 0 use streams 0 and 1), deliberately stopped early (200 steps of 64) so
that RL has room to improve it: greedy accuracy ~0.22 where pass@8 at temperature 1 is ~0.45. Single thread and
``torch.use_deterministic_algorithms(True)``: two runs on the same machine and torch build give identical
weights; across CPUs (other SIMD kernels) the last bits may differ, so the asset in the repo is the reference.

Usage: ``python scripts/build_tiny_model.py [--out DIR] [--steps N]`` (prints greedy accuracy per level).
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_gcpo.assets.tiny_model import (
    TINY_MODEL_PATH,
    build_char_tokenizer,
    build_tiny_config,
    build_tiny_model,
    greedy_accuracy,
    sft_warm_start,
)
from lit_gcpo.tasks.arithmetic import WARM_START_MIX, arithmetic_splits, sample_problems

SFT_DATA_SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=TINY_MODEL_PATH, help="output directory")
    parser.add_argument("--steps", type=int, default=200, help="SFT steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and SFT seed")
    parser.add_argument("--val-rows", type=int, default=400, help="validation rows for the printed accuracy")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(build_tiny_config(), seed=args.seed)
    problems = sample_problems(args.steps * args.batch_size, WARM_START_MIX, seed=SFT_DATA_SEED)
    start = time.perf_counter()
    losses = sft_warm_start(
        model, tokenizer, problems, args.steps, args.batch_size, args.lr, args.warmup_steps, seed=args.seed
    )
    print(f"SFT: {args.steps} steps in {time.perf_counter() - start:.1f} s, final loss {losses[-1]:.4f}")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    _, val_rows = arithmetic_splits(0, args.val_rows, seed=0)
    per_level = greedy_accuracy(model, tokenizer, val_rows)
    correct = sum(c for c, _ in per_level.values())
    print(f"greedy accuracy on {len(val_rows)} validation rows: {correct / len(val_rows):.3f}")
    for level, (c, n) in per_level.items():
        print(f"  level {level}: {c}/{n} = {c / n:.3f}")


if __name__ == "__main__":
    main()
