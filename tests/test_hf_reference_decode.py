"""The ``hf`` engine's tokens against a plain reference decode, on a quickstart-like batch: the embedded policy, its
arithmetic prompts, 8 samples per prompt at temperature 0.7, 16 new tokens, stop at "}", embeddings gathered.

The reference is an independent loop: one row at a time, no padding, no KV cache (the whole sequence recomputed at
every token), no rows leaving a batch; it draws each token by inverting the CDF of ``softmax(logits / T)`` at the
row's own uniform (the SplitMix64 streams of ``seeded_uniforms``, checked against plain Python in
``test_hf_engine.py``). The engine batches, pads, caches and drops finished rows, so its logits differ from the
reference's by float rounding (other matrix shapes), and a token may only differ where the reference's draw lies
within rounding of a CDF boundary (greedy: where the two best logits tie within rounding). Such a step ends the
comparison of its row; the tests require that it is rare and that every other token is the same, so that a change
of the loop that moves what is sampled (an off-by-one in the draws, the positions, the cache or the row order)
fails here rather than moving the quickstart's trajectory unnoticed.
"""

from __future__ import annotations

import pytest
import torch

import lit_gcpo.engines.decoding as decoding
from lit_gcpo.engines.base import SamplingConfig, end_of_sequence_ids
from lit_gcpo.engines.hf import HFEngine, seeded_uniforms
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.policy import load_policy, load_tokenizer

ROUNDING = 1e-6
"""A draw (sampling: of the CDF, a probability; greedy: of the logits) this close to the boundary between two tokens
may fall on either side of it with other matrix shapes: float32 logits carry about 1e-7 relative error."""


@pytest.fixture(scope="module")
def quickstart_policy():
    policy = load_policy("lit-gcpo/tiny-arith").eval()
    tokenizer = load_tokenizer("lit-gcpo/tiny-arith")
    rows = ArithmeticTask("train", num_train=5000, num_val=256, mix={2: 1.0}, seed=0).load()
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows[:24]]
    return policy, tokenizer, prompts


def _plain_decode(
    policy: torch.nn.Module,
    prompt: list[int],
    draws: list[float] | None,
    sampling: SamplingConfig,
    ends: set[int],
    texts: list[str],
) -> tuple[list[int], list[float], list[float]]:
    """One row (``draws``: its uniforms, None for greedy; ``texts``: each token's text, for the stop strings):
    ``(tokens, log-probs under softmax(logits / T), margin of each draw to its nearest token boundary)``."""
    temperature = sampling.temperature or 1.0
    ids, tokens, logprobs, margins, text = list(prompt), [], [], [], ""
    for t in range(sampling.max_new_tokens):
        with torch.no_grad():
            scaled = policy(torch.tensor([ids])).logits[0, -1].float() / temperature  # [V]
        if draws is None:  # greedy: the best logit, and its lead over the second
            best = scaled.topk(2).values
            token, margin = int(scaled.argmax()), float(best[0] - best[1])
        else:  # the first token whose cumulative probability reaches the draw
            cdf = torch.softmax(scaled, -1, dtype=torch.float64).cumsum(-1)  # [V]
            draw = draws[t] * float(cdf[-1])
            token = min(int((cdf < draw).sum()), cdf.numel() - 1)
            below = float(cdf[token - 1]) if token > 0 else 0.0
            margin = min(draw - below, float(cdf[token]) - draw)
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(scaled, -1)[token]))
        margins.append(margin)
        ids.append(token)
        text += texts[token]
        if token in ends or any(stop in text for stop in sampling.stop):
            break
    return tokens, logprobs, margins


def _compare(engine_out, policy, tokenizer, prompts, samples, sampling, seeds) -> tuple[int, int]:
    """``(rows compared to their end, rows whose comparison ended at a draw within rounding of a boundary)``; asserts
    every token (and log-prob) before such a draw, and every row without one, equal to the plain decode's."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    ends = set(end_of_sequence_ids(policy, tokenizer))
    sequences = [prompt for prompt in prompts for _ in range(samples)]
    uniforms = None
    if seeds is not None:  # the engine's key of sample j of a prompt with seed s
        keys = torch.tensor([seed * 1_000_003 + j for seed in seeds for j in range(samples)])
        uniforms = seeded_uniforms(keys, sampling.max_new_tokens)  # [N, T]
    exact, rounding = 0, 0
    for row, prompt in enumerate(sequences):
        draws = None if uniforms is None else uniforms[row].tolist()
        tokens, logprobs, margins = _plain_decode(policy, prompt, draws, sampling, ends, texts)
        mine = engine_out.completion_ids[row]
        differ = next((t for t, (a, b) in enumerate(zip(mine, tokens, strict=False)) if a != b), None)
        if differ is not None and margins[differ] < ROUNDING:
            rounding += 1
            continue
        assert mine == tokens, (row, differ, margins[differ] if differ is not None else None)
        torch.testing.assert_close(torch.tensor(engine_out.logprobs[row]), torch.tensor(logprobs), atol=1e-5, rtol=0)
        exact += 1
    return exact, rounding


@pytest.mark.parametrize("temperature", [0.7, 1.5], ids=["quickstart", "hotter"])
def test_sampled_tokens_equal_a_plain_reference_decode(quickstart_policy, temperature, monkeypatch):
    """At the quickstart's temperature, and hotter: more varied completions, more rows leaving the batch early."""
    policy, tokenizer, prompts = quickstart_policy
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=16, stop=["}"])
    seeds = [1000 + index for index in range(len(prompts))]
    batch_sizes = []  # of every forward pass: rows leaving the batch (and its cache) make it smaller
    forward = decoding.SamplingLoop._forward
    monkeypatch.setattr(
        decoding.SamplingLoop, "_forward", lambda loop, ids, *a: batch_sizes.append(len(ids)) or forward(loop, ids, *a)
    )
    out = HFEngine(policy, tokenizer).generate(prompts, 8, sampling, seeds=seeds, with_embeddings=True)
    assert len(set(batch_sizes)) > 1  # rows left while others ran on
    exact, rounding = _compare(out, policy, tokenizer, prompts, 8, sampling, seeds)
    assert exact + rounding == len(prompts) * 8
    assert rounding <= 1  # measured: 0 of 192 rows at either temperature


def test_greedy_tokens_equal_a_plain_reference_decode(quickstart_policy):
    policy, tokenizer, prompts = quickstart_policy
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16, stop=["}"])
    out = HFEngine(policy, tokenizer).generate(prompts, 1, sampling)
    exact, rounding = _compare(out, policy, tokenizer, prompts, 1, sampling, None)
    assert (exact, rounding) == (len(prompts), 0)
