"""VLLMEngine.sync_weights: trained weights reach vLLM from memory, bad weights are refused up front."""

from __future__ import annotations

import pytest
import torch

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.vllm import WeightSyncError

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def _long_prompt(tokenizer) -> list[int]:
    """200 tokens: more than vLLM's CPU block size (128), so its first block lands in the prefix cache."""
    ids = tokenizer("".join(f"{i}+{i + 1}=" for i in range(40)), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 200
    return ids[:200]


def test_synced_logprobs_follow_one_optimizer_step(engine, policy, tokenizer, recompute, restore_policy):
    prompt = _long_prompt(tokenizer)
    before = engine.generate([prompt], 1, GREEDY)  # fills the prefix cache with the old weights' KV
    completion = before.completion_ids[0]
    old_reference = recompute(policy, prompt, completion, 1.0)  # [T]
    assert (torch.tensor(before.logprobs[0]) - old_reference).abs().max().item() < 1e-3

    # One AdamW step that raises the likelihood of the greedy completion.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.tensor([prompt + completion])  # [1, P+T]
    logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [T, V]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(completion))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    engine.sync_weights(policy.state_dict().items())
    after = engine.generate([prompt], 1, GREEDY)  # same prompt: stale cached KV would show here
    new_ids = after.completion_ids[0]
    new_reference = recompute(policy, prompt, new_ids, 1.0)  # [T]
    assert (torch.tensor(after.logprobs[0]) - new_reference).abs().max().item() < 1e-3
    # The step moved the policy by far more than the tolerance: a stale engine could not pass above.
    assert (recompute(policy, prompt, completion, 1.0) - old_reference).abs().max().item() > 0.05


def test_bad_weights_are_refused_by_name_and_the_engine_still_generates(engine, policy, tokenizer):
    prompt = _long_prompt(tokenizer)[:20]
    reference = engine.generate([prompt], 1, GREEDY)
    state = dict(policy.state_dict())
    name = "model.layers.1.mlp.down_proj.weight"

    wrong_shape = {**state, name: state[name][:, :-1]}
    with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*shape"):
        engine.sync_weights(wrong_shape.items(), force=True)

    unknown = {**state, "model.layers.9.mlp.down_proj.weight": state[name]}
    with pytest.raises(WeightSyncError, match=r"model\.layers\.9\.mlp\.down_proj\.weight.*not in"):
        engine.sync_weights(unknown.items(), force=True)

    missing = {key: value for key, value in state.items() if key != name}
    with pytest.raises(WeightSyncError, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        engine.sync_weights(missing.items(), force=True)

    integer = {**state, name: state[name].long()}
    with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*dtype"):
        engine.sync_weights(integer.items(), force=True)

    again = engine.generate([prompt], 1, GREEDY)  # nothing was loaded: same weights, same output
    assert again.completion_ids == reference.completion_ids
    assert again.logprobs[0] == pytest.approx(reference.logprobs[0], abs=1e-6)


def test_sync_every_loads_only_every_kth_call(engine, policy):
    consumed: list[int] = []

    def weights(call: int):
        consumed.append(call)
        yield from policy.state_dict().items()

    engine.sync_every, engine._sync_calls = 3, 0
    try:
        for call in range(1, 7):
            engine.sync_weights(weights(call))
    finally:
        engine.sync_every = 1
    assert consumed == [3, 6]  # calls 1, 2, 4, 5 never read the weights
