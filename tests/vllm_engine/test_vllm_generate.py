"""VLLMEngine.generate against transformers on the same tiny model (counts, ids, greedy, log-probs, RNG)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine

pytestmark = pytest.mark.vllm

PROMPTS = ["12+34=", "7*8-5=", "(9+1)*3="]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_counts_ids_eos_and_truncation_flags(engine, policy, tokenizer):
    prompts = _encode(tokenizer, PROMPTS)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=3)
    out = engine.generate(prompts, num_samples=4, sampling=sampling)
    hf_out = HFEngine(policy, tokenizer).generate(prompts, num_samples=4, sampling=sampling)
    assert len(out.completion_ids) == len(hf_out.completion_ids) == 3 * 4
    assert len(out.truncated) == len(out.logprobs) == 12
    eos = tokenizer.eos_token_id
    for row, (ids, logprobs, truncated) in enumerate(zip(out.completion_ids, out.logprobs, out.truncated, strict=True)):
        assert 1 <= len(ids) <= 12, row
        assert all(0 <= token < len(tokenizer) for token in ids), row
        assert len(logprobs) == len(ids), row
        assert all(lp <= 0.0 for lp in logprobs), row
        assert eos not in ids[:-1], row  # EOS can only end a completion
        # truncated <=> the limit was hit without EOS
        assert truncated == (ids[-1] != eos and len(ids) == 12), row


def test_greedy_completions_equal_transformers(engine, policy, tokenizer):
    prompts = _encode(tokenizer, PROMPTS)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    vllm_out = engine.generate(prompts, num_samples=2, sampling=greedy)
    hf_out = HFEngine(policy, tokenizer).generate(prompts, num_samples=2, sampling=greedy)
    assert vllm_out.completion_ids == hf_out.completion_ids
    assert vllm_out.truncated == hf_out.truncated
    # Greedy samples of a group are identical, and a random model does not stop at once.
    assert vllm_out.completion_ids[0] == vllm_out.completion_ids[1]
    assert len(vllm_out.completion_ids[0]) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_logprobs_match_log_softmax_recomputation(engine, policy, tokenizer, recompute, temperature):
    prompts = _encode(tokenizer, PROMPTS[:2])
    out = engine.generate(prompts, 3, SamplingConfig(temperature=temperature, max_new_tokens=10, seed=11))
    worst = 0.0
    for row, (ids, logprobs) in enumerate(zip(out.completion_ids, out.logprobs, strict=True)):
        reference = recompute(policy, prompts[row // 3], ids, temperature)  # [T]
        worst = max(worst, (torch.tensor(logprobs) - reference).abs().max().item())
    assert worst < 1e-3


def test_seeded_calls_repeat_and_unseeded_calls_differ(engine, tokenizer):
    prompts = _encode(tokenizer, PROMPTS[:1]) * 2  # the same prompt twice in one call
    seeded = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=5)
    first = engine.generate(prompts, 4, seeded).completion_ids
    assert engine.generate(prompts, 4, seeded).completion_ids == first
    # Two copies of one prompt get different seeds (no shared noise across groups).
    assert first[:4] != first[4:]
    unseeded = SamplingConfig(temperature=1.0, max_new_tokens=12)
    # The engine's own RNG stream advances between calls even though the caller's RNG is restored.
    assert engine.generate(prompts, 4, unseeded).completion_ids != engine.generate(prompts, 4, unseeded).completion_ids


def test_engine_creation_leaves_the_callers_rng_untouched(engine_and_rng_states):
    _, (before, after) = engine_and_rng_states
    assert torch.equal(before, after)


def test_generate_leaves_the_callers_rng_untouched(engine, tokenizer):
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    engine.generate(_encode(tokenizer, PROMPTS), 4, SamplingConfig(temperature=1.0, max_new_tokens=8))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert random.getstate() == python_state


def test_prompt_errors_name_the_row(engine, tokenizer):
    prompts = [*_encode(tokenizer, PROMPTS[:1]), []]
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate(prompts, 2, SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] has 600 tokens"):
        engine.generate([[5] * 600], 2, SamplingConfig(max_new_tokens=4))


def test_every_end_of_sequence_id_stops_like_the_hf_engine(engine, policy, tokenizer):
    """A second end-of-sequence id (a chat model's <|im_end|>, listed by its generation config) ends the
    completion in vLLM as in the hf engine."""
    prompts = _encode(tokenizer, PROMPTS[:1])
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    free = engine.generate(prompts, 1, greedy).completion_ids[0]
    second = free[2]
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    saved = engine.eos_token_ids
    try:
        from lit_gcpo.engines.base import end_of_sequence_ids

        engine.eos_token_ids = end_of_sequence_ids(policy, tokenizer)  # what the constructor reads
        stopped = engine.generate(prompts, 1, greedy)
        hf = HFEngine(policy, tokenizer).generate(prompts, 1, greedy)
    finally:
        engine.eos_token_ids = saved
        policy.generation_config.eos_token_id = tokenizer.eos_token_id
    assert stopped.completion_ids[0] == free[: free.index(second) + 1] == hf.completion_ids[0]
    assert stopped.truncated == hf.truncated == [False]


def test_min_tokens_suppresses_every_end_of_sequence_id_like_the_hf_engine(engine, policy, tokenizer):
    """``min_tokens`` reaches vLLM's own: greedy, with the completion's third token made a second end-of-sequence
    id, the completion ends there without it and runs past it with min_tokens 6, the same tokens as the hf engine
    and log-probs of the distribution with both ids at -inf (not the policy's own: the suppressed id was the
    argmax there). With min_tokens = max_new_tokens every sampled completion has exactly that many tokens."""
    prompts = _encode(tokenizer, PROMPTS[:1])
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    second = engine.generate(prompts, 1, greedy).completion_ids[0][2]
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    saved = engine.eos_token_ids
    try:
        from lit_gcpo.engines.base import end_of_sequence_ids

        engine.eos_token_ids = end_of_sequence_ids(policy, tokenizer)  # what the constructor reads
        held = SamplingConfig(temperature=0.0, max_new_tokens=16, min_tokens=6)
        stopped, out = engine.generate(prompts, 1, greedy), engine.generate(prompts, 1, held)
        hf = HFEngine(policy, tokenizer).generate(prompts, 1, held)
    finally:
        engine.eos_token_ids = saved
        policy.generation_config.eos_token_id = tokenizer.eos_token_id
    completion = out.completion_ids[0]
    assert len(stopped.completion_ids[0]) == 3 and len(completion) >= 6 and second not in completion[:6]
    assert completion == hf.completion_ids[0]
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), torch.tensor(hf.logprobs[0]), atol=1e-3, rtol=0)
    with torch.no_grad():  # the policy's own log-prob of token 2, which the suppressed distribution exceeds
        logits = policy(torch.tensor([prompts[0] + completion])).logits[0, len(prompts[0]) + 1].float()
    assert out.logprobs[0][2] - torch.log_softmax(logits, -1)[completion[2]].item() > 0.05
    same_length = SamplingConfig(temperature=1.0, max_new_tokens=12, min_tokens=12, seed=3)
    sampled = engine.generate(_encode(tokenizer, PROMPTS), 4, same_length)
    assert [len(ids) for ids in sampled.completion_ids] == [12] * 12 and all(sampled.truncated)
