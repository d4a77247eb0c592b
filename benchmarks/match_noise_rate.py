"""The coin rate of the noisy testbeds: the p whose coin-flip groups look like the clean spread groups to RD.

GCPO calibrates its geometric signal by Reward Dispersion, and with G binary rewards RD depends only on k, the
number of correct completions. If the coin-flip groups of ``NoisyArithmeticTask`` had another distribution of k
than the clean groups with reward spread, RD alone could tell them apart and a difference between ``gcpo_*`` and
``rd_only`` would not be geometry's. This script samples the starting policy's groups on the comparison's training
prompts (``configs/compare_arithmetic.yaml``: G = 8 at its temperature, stopped at its stop strings, graded by
``math_accuracy``), tallies k per answer kind (``short``: one digit, the easy prompts; ``long``: two digits or a
sign, the hard ones), and finds the p in a grid whose Bin(G, p), restricted to 1 <= k <= G - 1, is closest in
total variation to the clean spread groups' distribution of k.

    python benchmarks/match_noise_rate.py --prompts 400
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section

from lit_gcpo.assets.tiny_model import resolve_model_path
from lit_gcpo.rewards.math_reward import math_accuracy
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.tasks.noisy_arithmetic import answer_kind

REPO = Path(__file__).resolve().parent.parent


def group_k(
    model, tokenizer, prompt: str, answer: str, group: int, temperature: float, stop: list[str], max_new_tokens: int
) -> int:
    """Correct completions among ``group`` sampled for ``prompt`` (each cut after its first stop string)."""
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **encoded,
            do_sample=True,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            num_return_sequences=group,
            pad_token_id=tokenizer.pad_token_id,
            top_k=0,
            top_p=1.0,
        )
    texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    for token in stop:
        texts = [text[: text.index(token) + len(token)] if token in text else text for text in texts]
    return int(sum(score or 0.0 for score in math_accuracy([prompt] * group, texts, answer=[answer] * group)))


def closest_rate(counts: np.ndarray, group: int, grid: np.ndarray) -> tuple[float, float]:
    """``(p, total variation)`` of the grid point whose Bin(group, p) on 1..group-1 is closest to ``counts``
    (``counts[j]`` = clean groups with j + 1 correct)."""
    target = counts / counts.sum()
    ks = np.arange(1, group)
    distances = []
    for p in grid:
        model = binom.pmf(ks, group, p)
        distances.append(0.5 * np.abs(model / model.sum() - target).sum())
    best = int(np.argmin(distances))
    return float(grid[best]), float(distances[best])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "compare_arithmetic.yaml"))
    parser.add_argument("--prompts", type=int, default=400, help="training prompts to sample groups for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    data = config["data"]
    sampling, group = data["sampling"], int(data["group_size"])
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config["model"]["model"])
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    rows = ArithmeticTask(**data["train"]["init_args"]).load()[: args.prompts]
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for row in rows:
        k = group_k(
            model,
            tokenizer,
            row["prompt"],
            row["answer"],
            group,
            float(sampling["temperature"]),
            list(sampling.get("stop") or []),
            int(sampling["max_new_tokens"]),
        )
        by_kind[answer_kind(row["answer"])].append(k)
    every = [k for ks in by_kind.values() for k in ks]
    spread = np.array([sum(1 for k in every if k == j) for j in range(1, group)], dtype=float)
    p, distance = closest_rate(spread, group, np.round(np.arange(0.05, 0.51, 0.01), 2))
    lines = [
        "## Coin rate of the noisy testbeds (match_noise_rate.py)",
        "",
        run_header(),
        f"Starting policy `{config['model']['model']}`, the first {len(rows)} training prompts of "
        f"`{Path(args.config).name}`, G = {group} at temperature {sampling['temperature']}, torch seed {args.seed}.",
        "",
        "| prompts | groups | mean k | groups with k = 0, 1, ..., G |",
        "|---|---|---|---|",
    ]
    for kind, ks in [*sorted(by_kind.items()), ("all", every)]:
        tally = ", ".join(str(sum(1 for k in ks if k == j)) for j in range(group + 1))
        lines.append(f"| {kind} | {len(ks)} | {np.mean(ks):.2f} | {tally} |")
    lines += [
        "",
        f"Closest Bin({group}, p) to the clean spread groups' k (1..{group - 1}): p = {p:.2f}, total "
        f"variation {distance:.3f}.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_results_section("match_noise_rate", lines)


if __name__ == "__main__":
    main()
