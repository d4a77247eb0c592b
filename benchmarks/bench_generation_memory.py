"""Peak memory of generating with a Qwen-sized vocabulary: the hf engine's loop vs ``generate`` asked for logits.

    python benchmarks/bench_generation_memory.py      # writes the "generation_memory" section of RESULTS.md

A 1-layer Llama with V = 151,936 (Qwen2.5's vocabulary) and hidden size 16, so that the logits dominate:
16 sequences x 64 new tokens. The previous engine asked ``generate`` for every step's logits and stacked them
([n, T, V] float32: 16 x 64 x 151,936 x 4 B = 594 MiB) to compute log-probs; the engine's loop keeps the
sampled token's log-prob of each step and drops the step's logits. Each variant runs in a fresh process and
reports the growth of its peak RSS during the generation (after a warm-up call).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section

N_PROMPTS, SAMPLES, NEW_TOKENS, VOCAB = 4, 4, 64, 151_936

CHILD = """
import json, resource, sys, torch
from types import SimpleNamespace
from transformers import LlamaConfig, LlamaForCausalLM
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
variant, n_prompts, samples, new_tokens, vocab = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=0)
model = LlamaForCausalLM(config).eval()
prompts = [[5, 6, 7, 8]] * n_prompts

def run(tokens):
    if variant == "loop":
        engine = HFEngine(model, SimpleNamespace(eos_token_id=1, pad_token_id=0))
        out = engine.generate(prompts, samples, SamplingConfig(max_new_tokens=tokens), seeds=list(range(n_prompts)))
        return sum(map(len, out.completion_ids))
    ids = torch.tensor([p for p in prompts for _ in range(samples)])
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, max_new_tokens=tokens, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=1, pad_token_id=0)
        logits = torch.stack(out.logits, dim=1).float()  # [n, T, V], as the previous engine did
        new = out.sequences[:, ids.shape[1]:]
        torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1))
    return int(new.numel())

run(4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = run(new_tokens)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (after - before) / 1024, "tokens": tokens}))
"""


def measure(variant: str) -> dict:
    args = [str(v) for v in (N_PROMPTS, SAMPLES, NEW_TOKENS, VOCAB)]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, variant, *args], capture_output=True, text=True, check=True, timeout=900
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    loop, stacked = measure("loop"), measure("generate_with_logits")
    stacked_bytes = N_PROMPTS * SAMPLES * NEW_TOKENS * VOCAB * 4 / 2**20
    lines = [
        "## Generation memory at Qwen's vocabulary (bench_generation_memory.py)",
        "",
        run_header(),
        f"1-layer Llama, V = {VOCAB:,}, {N_PROMPTS * SAMPLES} sequences x {NEW_TOKENS} new tokens; growth of peak RSS "
        f"during one generation (stacked float32 logits alone would be {stacked_bytes:.0f} MiB).",
        "",
        "| engine | peak RSS growth (MiB) | tokens generated |",
        "| --- | --- | --- |",
        f"| `hf` engine loop (per-step log-probs) | {loop['extra_mib']:.0f} | {loop['tokens']} |",
        f"| `generate(output_logits=True)` + stacked log-softmax (before) | {stacked['extra_mib']:.0f} | "
        f"{stacked['tokens']} |",
        "",
        f"Ratio loop / before: {loop['extra_mib'] / max(stacked['extra_mib'], 1e-9):.3f}.",
    ]
    write_results_section("generation_memory", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
