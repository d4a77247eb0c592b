"""The hf engine's decoding steps handed sdpa's mask for one query column (``decoding.sdpa_step_masks_exact``): only
for an sdpa policy whose cache is all full attention, only while a row has padding, and the same completions and
bit-equal log-probs as when transformers builds the mask at every step."""

from __future__ import annotations

import pytest
import torch
import transformers

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.decoding import sdpa_step_masks_exact
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.training.policy import load_policy, load_tokenizer


class StepMasks:
    """The ``attention_mask`` of every forward of ``policy``'s decoder: its number of dimensions and query width."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.seen: list[tuple[int, int]] = []
        self.remove = policy.get_decoder().register_forward_pre_hook(self._record, with_kwargs=True).remove

    def _record(self, _module, _args, kwargs) -> None:
        self.seen.append((kwargs["attention_mask"].ndim, kwargs["input_ids"].shape[1]))


def test_decoding_steps_get_sdpas_mask_and_sample_bit_for_bit_as_before(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    assert policy.config._attn_implementation == "sdpa" and sdpa_step_masks_exact(policy)
    prompts = [tokenizer(text)["input_ids"] for text in ("3+4=", "12*3=", "7-9=")]  # two left-padded
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    outs = {}
    for step_masks in (True, False):
        engine = HFEngine(policy, tokenizer)
        engine._step_masks = step_masks
        masks = StepMasks(policy)
        outs[step_masks] = engine.generate(prompts, 4, sampling, seeds=[1, 2, 3])
        decoding = [ndim for ndim, width in masks.seen if width == 1]
        assert masks.seen[0] == (2, max(map(len, prompts)))  # the prefill: transformers builds its causal mask
        assert set(decoding) == ({4} if step_masks else {2}) and len(decoding) >= 8
        masks.remove()
    assert outs[True].completion_ids == outs[False].completion_ids
    assert outs[True].logprobs == outs[False].logprobs  # bit for bit
    assert len(set(map(tuple, outs[True].completion_ids))) > 6


def test_unpadded_rows_get_no_mask_as_transformers_gives_them(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    engine = HFEngine(policy, tokenizer)
    assert engine._exact_step_masks()  # checked once (its own probe passes a 4-D mask), before the spy
    masks = StepMasks(policy)
    engine.generate([tokenizer("3+4=")["input_ids"]] * 2, 3, SamplingConfig(temperature=1.0, max_new_tokens=6))
    assert {ndim for ndim, _ in masks.seen} == {2} and len(masks.seen) >= 6  # no padding: the 2-D mask throughout


@pytest.mark.parametrize("kind", ["eager", "sliding"])
def test_other_attentions_and_caches_keep_transformers_masks(kind):
    common = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if kind == "eager":  # the additive float mask of eager attention is not sdpa's
        config, attention = transformers.LlamaConfig(**common), "eager"
    else:  # a sliding window: the step's mask depends on the window
        config = transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=3)
        attention = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    assert not sdpa_step_masks_exact(model)
