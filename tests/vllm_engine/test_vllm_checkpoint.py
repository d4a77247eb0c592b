"""The checkpoint VLLMEngine starts from: LoRA merged with Hugging Face names, tied aliases recognised."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lit_gcpo.engines.vllm_checkpoint import checkpoint_spec, policy_state_names, write_policy

pytestmark = pytest.mark.vllm


def test_peft_policy_is_saved_merged_with_plain_names(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    from lit_gcpo.assets.tiny_model import build_tiny_config, build_tiny_model

    base = build_tiny_model(build_tiny_config(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=96))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters matter
            parameter.data.normal_()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    write_policy(model, tokenizer, str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))

    assert not any("lora_" in name or "base_layer" in name for name in saved)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    # merged = W + (alpha / r) * B @ A, with alpha / r = 4 / 2 = 2
    expected = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight  # [out, in]
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], expected.detach())
    torch.testing.assert_close(saved["model.layers.0.mlp.up_proj.weight"], base.model.layers[0].mlp.up_proj.weight)
    for name, tensor in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(tensor, before[name]), name
    # The trainer's merged names: the checkpoint's plus the tied head, which save_pretrained omits.
    assert policy_state_names(model) - set(checkpoint_spec(str(tmp_path))) == {"lm_head.weight"}
    assert checkpoint_spec(str(tmp_path))["model.layers.0.self_attn.q_proj.weight"] == ((64, 64), torch.float32)
