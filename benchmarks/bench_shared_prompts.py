"""CPU time of the passes that share a prompt's forward among its G completions, against the same passes without
(``lit_gcpo.training.shared_prompts``), on the work of ``bench_vs_trl.py``: its random Llama of each size, 8 prompts
x G = 8 completions, temperature 1, up to the size's new tokens.

- ``prefill``: the hf engine's step 0 (each distinct prompt fed once, its cache rows and logits copied) and the
  whole ``generate`` call, the sampled completions compared token for token;
- ``train``: the training pass of those completions as the module runs it (``CompletionScorer`` forward with
  entropies, a policy-gradient-like loss, backward), the log-probs compared.

One process, one torch thread (CPU seconds are the work itself, steadier than wall time on a shared machine), the
variants interleaved over ``--rounds`` rounds (plain first in odd rounds); medians over rounds.

    python benchmarks/bench_shared_prompts.py [--sizes tiny 20m] [--rounds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import run_header, write_results_section
from vs_trl_work import GROUP_SIZE, PROMPTS_PER_STEP, SIZES, build_model, build_tokenizer, prompt_rows

import lit_gcpo.engines.decoding as decoding
from lit_gcpo.data.rollout import pack_sequences
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.training.scoring import CompletionScorer
from lit_gcpo.training.shared_prompts import prompt_runs


class Generation:
    """The engine with its prefill shared or not (``prompt_runs`` of the sampling loop replaced by None), timed."""

    def __init__(self, model: torch.nn.Module, size: Any) -> None:
        tokenizer = build_tokenizer()
        self.engine = HFEngine(model, tokenizer)
        rows = prompt_rows()[:: len(prompt_rows()) // PROMPTS_PER_STEP][:PROMPTS_PER_STEP]
        self.prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
        self.sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=size.max_new_tokens)
        self.prefill_s = 0.0
        loop = decoding.SamplingLoop
        original = loop._prefill

        def timed(loop_self: Any) -> torch.Tensor:
            start = time.process_time()
            out = original(loop_self)
            self.prefill_s = time.process_time() - start
            return out

        loop._prefill = timed

    def __call__(self, shared: bool) -> tuple[Any, float, float]:
        """``(generation, generate CPU s, prefill CPU s)``."""
        decoding.prompt_runs = prompt_runs if shared else (lambda *args: None)
        try:
            start = time.process_time()
            out = self.engine.generate(self.prompts, GROUP_SIZE, self.sampling, seeds=list(range(PROMPTS_PER_STEP)))
            return out, time.process_time() - start, self.prefill_s
        finally:
            decoding.prompt_runs = prompt_runs


def train_pass(scorer: CompletionScorer, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple:
    """One training pass (forward with entropies, loss, backward): ``(log-probs, CPU s)``."""
    input_ids, attention_mask, mask = batch
    advantages = torch.linspace(-1.0, 1.0, input_ids.shape[0]).unsqueeze(-1)  # [N, 1]
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    scored = scorer(input_ids, attention_mask, mask.shape[1], temperature=1.0, with_entropy=True)
    ((scored.logprobs * advantages + 0.01 * scored.entropy) * mask).sum().backward()
    return scored.logprobs.detach(), time.process_time() - start


def measure(size_name: str, rounds: int) -> dict[str, Any]:
    size = SIZES[size_name]
    model = build_model(size=size)
    generation = Generation(model.eval(), size)
    scorers = {True: CompletionScorer(model, 4096), False: CompletionScorer(model, 4096, share_prompts=False)}
    assert scorers[True].shares_prompts, scorers[True].prompt_sharing_problem
    times: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in ("generate", "prefill", "train")}
    same_tokens, gap, tokens = True, 0.0, 0
    for round_ in range(rounds + 1):  # round 0: warm-up, not counted
        outs, logprobs = {}, {}
        for shared in (False, True) if round_ % 2 else (True, False):
            out, generate_s, prefill_s = generation(shared)
            outs[shared] = out
            batch = pack_sequences(
                [p for p in generation.prompts for _ in range(GROUP_SIZE)], out.completion_ids, 0, torch.device("cpu")
            )
            model.train()
            logprobs[shared], train_s = train_pass(scorers[shared], model, batch)
            model.eval()
            if round_:
                for key, value in (("generate", generate_s), ("prefill", prefill_s), ("train", train_s)):
                    times[key][shared].append(value)
        same_tokens &= outs[True].completion_ids == outs[False].completion_ids
        if same_tokens:
            gap = max(gap, float((logprobs[True] - logprobs[False]).abs().max()))
        tokens = sum(map(len, outs[True].completion_ids))
    medians = {key: {shared: statistics.median(v) for shared, v in value.items()} for key, value in times.items()}
    return {
        "size": size,
        "rounds": rounds,
        "medians": medians,
        "same_tokens": same_tokens,
        "gap": gap,
        "tokens": tokens,
    }


def report(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Shared prompt passes (`bench_shared_prompts.py`)",
        "",
        run_header(),
        f"The work of `bench_vs_trl.py` ({PROMPTS_PER_STEP} prompts x G = {GROUP_SIZE}, temperature 1): the hf "
        "engine's generate (and its step-0 prefill, part of it) and the training pass of the sampled completions "
        "(forward with entropies, loss, backward), each prompt's pass shared by its G completions or not. CPU seconds "
        "on one torch thread, median over the interleaved rounds (after a warm-up round).",
        "",
        "| size | rounds | pass | not shared (s) | shared (s) | shared / not | checks |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        size, medians = result["size"], result["medians"]
        check = "same completions" if result["same_tokens"] else "**completions differ**"
        for key in ("prefill", "generate", "train"):
            plain, shared = medians[key][False], medians[key][True]
            note = {
                "generate": f"{check}, {result['tokens']} tokens",
                "train": f"log-probs within {result['gap']:.1e}",
            }.get(key, "")
            row = f"| {size.name} | {result['rounds']} | {key} | {plain:.4f} | {shared:.4f} | {shared / plain:.2f}x |"
            lines.append(f"{row} {note} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "20m"])
    parser.add_argument("--rounds", type=int, default=5, help="for tiny; 20m takes half as many (at least 1)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(size, args.rounds if size == "tiny" else max(1, args.rounds // 2)) for size in args.sizes]
    lines = report(results)
    print("\n".join(lines))
    if not args.no_write:
        write_results_section("bench_shared_prompts", lines)


if __name__ == "__main__":
    main()
