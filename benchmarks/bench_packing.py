"""Time and peak memory of padded vs padding-free (packed) log-prob passes, on completions whose lengths vary tenfold.

The passes are those of ``lit_gcpo.training.scoring.CompletionScorer``, as the module runs them: ``score`` is the
no-grad pass of ``score_rollout`` (old and reference log-probs), ``train`` the training step's forward and backward
of a token-mean loss of log-probs and entropies. The model is a randomly initialised Llama (4 layers, hidden 256,
vocabulary 8,192, sdpa attention, float32); the batch N = 8 completions of 25 to 250 tokens (log-uniform, both ends
present) after prompts of 16 to 64 tokens (left-padded), so the padded pass computes ``N (P + L)`` positions and the
packed one only the real tokens. On the CPU the packed pass is sdpa with the block-diagonal causal mask transformers
derives from the restarting position ids: it skips the padding in every matmul, but its attention still spans the
whole packed row (``S^2`` scores, most of them masked); flash-attention's varlen kernel on a GPU would compute only
the ``sum_i len_i^2`` within sequences (not run here: no GPU).

Each measurement runs in a fresh process (peak RSS is a high-water mark): one warm-up pass, then ``PASSES`` timed
passes (their median); memory is the peak RSS increase over the process once the model and batch exist. The machine
is shared with other jobs, so the variants are interleaved (padded, packed, padded, ...) over ``REPEATS`` rounds and
the table gives medians over rounds, with the load average.

    python benchmarks/bench_packing.py
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

N, PROMPT_RANGE, COMPLETION_RANGE = 8, (16, 64), (25, 250)
VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 8192, 256, 4, 4, 688
CHUNK, PASSES, REPEATS, THREADS = 4096, 3, 5, 1
VARIANTS = [(phase, layout) for phase in ("score", "train") for layout in ("padded", "packed")]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def lengths(seed: int = 0) -> tuple[list[int], list[int]]:
    """Prompt and completion lengths: completions log-uniform over ``COMPLETION_RANGE``, its two ends included."""
    generator = torch.Generator().manual_seed(seed)
    low, high = COMPLETION_RANGE
    u = torch.rand(N, generator=generator)
    u[0], u[1] = 0.0, 1.0
    completions = (low * (high / low) ** u).round().long().tolist()
    prompts = torch.randint(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, (N,), generator=generator).tolist()
    return prompts, completions


def _model_and_batch() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    import transformers

    from lit_gcpo.data.rollout import pack_sequences

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=1024,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    prompts, completions = lengths()
    ids = [torch.randint(1, VOCAB, (p + c,)).tolist() for p, c in zip(prompts, completions, strict=True)]
    batch = pack_sequences(
        [x[:p] for x, p in zip(ids, prompts, strict=True)],
        [x[p:] for x, p in zip(ids, prompts, strict=True)],
        0,
        torch.device("cpu"),
    )
    return model, batch


def _run_variant(phase: str, layout: str) -> dict[str, float]:
    """``PASSES`` timed passes of one variant in this process, after a warm-up."""
    from lit_gcpo.training.scoring import CompletionScorer

    torch.set_num_threads(THREADS)
    model, (input_ids, attention_mask, mask) = _model_and_batch()
    scorer = CompletionScorer(model, CHUNK, plain_head=True, padding_free=layout == "packed")
    length = mask.shape[1]
    base_mb = _rss_mb()

    def one_pass() -> torch.Tensor:
        if phase == "score":
            model.eval()
            with torch.no_grad():
                return scorer(input_ids, attention_mask, length, temperature=1.0).logprobs
        model.train()
        model.zero_grad(set_to_none=True)
        scored = scorer(input_ids, attention_mask, length, temperature=1.0, with_entropy=True)
        loss = (mask * (scored.logprobs + 0.01 * scored.entropy)).sum() / mask.sum()
        loss.backward()
        return scored.logprobs.detach()

    one_pass()  # warm-up
    seconds = []
    for _ in range(PASSES):
        start = time.perf_counter()
        logprobs = one_pass()
        seconds.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    checksum = float((logprobs * mask).sum())
    return {"seconds": statistics.median(seconds), "peak_extra_mb": peak_mb - base_mb, "checksum": checksum}


def _child(phase: str, layout: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", phase, layout],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    if out.returncode != 0:
        raise SystemExit(f"{phase} {layout} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: dict[tuple[str, str], list[dict[str, float]]]) -> list[str]:
    rows = [
        "| pass | layout | time, median (min - max) over rounds | peak extra memory, median | time ratio "
        "packed / padded | memory ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for phase in ("score", "train"):
        med = {}
        for layout in ("padded", "packed"):
            runs = results[(phase, layout)]
            t = [r["seconds"] for r in runs]
            m = statistics.median(r["peak_extra_mb"] for r in runs)
            med[layout] = (statistics.median(t), m)
            ratio = (
                ("", "")
                if layout == "padded"
                else (f"{med['packed'][0] / med['padded'][0]:.2f}", f"{med['packed'][1] / med['padded'][1]:.2f}")
            )
            rows.append(
                f"| {phase} | {layout} | {statistics.median(t):.3f} s ({min(t):.3f} - {max(t):.3f}) | {m:,.0f} MB | "
                f"{ratio[0]} | {ratio[1]} |"
            )
    return rows


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import run_header, write_results_section

    results: dict[tuple[str, str], list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for round_ in range(REPEATS):  # interleaved: every variant once per round
        for phase, layout in VARIANTS:
            result = _child(phase, layout)
            results[(phase, layout)].append(result)
            print(
                f"round {round_} {phase:5s} {layout:6s}: {result['seconds']:.3f} s, +{result['peak_extra_mb']:.0f} MB"
            )
    for phase in ("score", "train"):  # the same log-probs either way
        a, b = results[(phase, "padded")][0]["checksum"], results[(phase, "packed")][0]["checksum"]
        assert abs(a - b) <= 1e-4 * abs(a), (phase, a, b)
    prompts, completions = lengths()
    width = max(prompts) + max(completions)
    real = sum(prompts) + sum(completions)
    lines = [
        "## Padding-free passes (bench_packing.py)",
        "",
        run_header(threads=THREADS),
        "The machine was shared with other jobs throughout (two long comparison runners and other test runs; see the",
        f"load average): the {REPEATS} rounds interleave the variants, each measurement a fresh process, and the",
        "table gives medians over rounds (each round's time is the median of 3 passes after a warm-up).",
        "",
        f"Random Llama ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, vocabulary {VOCAB:,}, sdpa, float32); N = {N}",
        f"completions of {min(completions)} to {max(completions)} tokens (x{max(completions) / min(completions):.0f}) "
        f"after prompts of {min(prompts)} to {max(prompts)} tokens: the padded pass runs {N} x {width} = "
        f"{N * width:,} positions, the packed one {real:,} ({real / (N * width):.0%}); the completion head",
        f"scores {N} x {max(completions)} = {N * max(completions):,} positions padded, {sum(completions):,} packed.",
        "`score`: no-grad pass (old / reference log-probs); `train`: forward + backward of a token-mean loss of",
        "log-probs and entropies. Memory: peak RSS increase over the loaded model and batch.",
        "",
        *_table(results),
        "",
        "On the CPU the packed pass's sdpa attention spans the whole packed row with a block-diagonal mask (S^2",
        "scores); the saving comes from the matmuls of the layers and the head, which skip the padding. Not run here:",
        "flash-attention's varlen kernel on a GPU, which also skips the masked attention blocks.",
    ]
    write_results_section("bench_packing", lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_run_variant(sys.argv[2], sys.argv[3])))
    else:
        main()
