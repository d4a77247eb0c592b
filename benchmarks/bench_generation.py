"""Where generation spends its time for a small model: the ``hf`` engine against transformers' ``generate``.

The embedded tiny policy (2 layers, hidden 128, 26-token vocabulary), 64 rows (8 prompts x 8 samples) of up
to 32 new tokens at temperature 1, one torch thread, CPU time (``time.process_time``: steadier than wall time
on a shared machine). Variants:

- ``hf engine``: lit-gcpo's sampling loop (per-prompt seeded inverse-CDF sampling over the model's forward
  with a ``DynamicCache``, sampled-token log-probs kept);
- ``hf engine + embeddings``: the same loop also gathering each completion's mean final hidden state (one more
  forward step), what GCPO's callback reads;
- ``generate (dynamic cache)``: ``model.generate(do_sample=True)`` as TRL calls it (no scores kept);
- ``generate (static cache)``: the same with ``cache_implementation="static"``.

Each variant runs ``--repeats`` times after one warm-up call; the table gives the median and the minimum and
the model forward's share of the engine's time (cProfile of one call). The script prints a table and writes
its section of ``benchmarks/RESULTS.md``.

    python benchmarks/bench_generation.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from _common import run_header, write_results_section

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.policy import load_policy, load_tokenizer

PROMPTS, SAMPLES, MAX_NEW_TOKENS = 8, 8, 32


def _cpu_seconds(call, repeats: int) -> list[float]:
    call()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("lit-gcpo/tiny-arith")
    policy = load_policy("lit-gcpo/tiny-arith", dtype="float32").eval()
    rows = ArithmeticTask("train", num_train=64, num_val=8, seed=0).load()[:PROMPTS]
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)
    engine = HFEngine(policy, tokenizer)
    seeds = list(range(PROMPTS))

    # left-padded batch for generate: every prompt repeated SAMPLES times
    width = max(map(len, prompts))
    ids = torch.full((PROMPTS * SAMPLES, width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row in range(PROMPTS * SAMPLES):
        prompt = prompts[row // SAMPLES]
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1

    def generate(cache: str | None):
        def call():
            with torch.no_grad():
                policy.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=MAX_NEW_TOKENS,
                    pad_token_id=tokenizer.pad_token_id,
                    cache_implementation=cache,
                )

        return call

    variants = {
        "hf engine": lambda: engine.generate(prompts, SAMPLES, sampling, seeds=seeds),
        "hf engine + embeddings": lambda: engine.generate(
            prompts, SAMPLES, sampling, seeds=seeds, with_embeddings=True
        ),
        "generate (dynamic cache)": generate(None),
        "generate (static cache)": generate("static"),
    }
    results = {name: _cpu_seconds(call, args.repeats) for name, call in variants.items()}

    profile = cProfile.Profile()
    profile.runcall(variants["hf engine"])
    stats = pstats.Stats(profile)
    total = max(entry[3] for entry in stats.stats.values())  # cumulative time of the outermost call
    # the outermost model forward (LlamaForCausalLM's) has the largest cumulative time of the Llama forwards
    forward = max(entry[3] for key, entry in stats.stats.items() if key[2] == "forward" and "modeling_llama" in key[0])
    model_share = forward / total if total else float("nan")

    lines = [
        "## Generation of a small model: hf engine vs transformers' generate (`bench_generation.py`)",
        "",
        run_header(threads=torch.get_num_threads()),
        f"The embedded tiny policy, {PROMPTS} prompts x {SAMPLES} samples, up to {MAX_NEW_TOKENS} new tokens, "
        f"temperature 1; CPU seconds per call over {args.repeats} calls after a warm-up.",
        "",
        "| variant | median (s) | min (s) | vs hf engine |",
        "| --- | ---: | ---: | ---: |",
    ]
    medians = {name: statistics.median(times) for name, times in results.items()}
    for name, times in results.items():
        ratio = medians[name] / medians["hf engine"]
        lines.append(f"| {name} | {medians[name]:.4f} | {min(times):.4f} | {ratio:.2f}x |")
    static = medians["generate (static cache)"] / medians["generate (dynamic cache)"]
    lines += [
        "",
        f"The model's forward (LlamaForCausalLM) is {model_share:.0%} of the hf engine's time (cProfile, one call):"
        " the loop's own work (sampling, stopping, bookkeeping) is the rest. A static cache takes "
        f"{static:.2f}x the dynamic cache's time in `generate`.",
    ]
    print("\n".join(lines))
    write_results_section("bench_generation", lines)


if __name__ == "__main__":
    main()
