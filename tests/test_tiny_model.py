"""The character tokenizer, the tiny Llama builders, the SFT warm start and the shipped ``tiny-arith`` asset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lit_gcpo.assets.tiny_model import (
    BOX_TOKEN,
    TINY_MODEL_NAME,
    TINY_MODEL_PATH,
    VOCAB,
    boxed_answer,
    build_char_tokenizer,
    build_tiny_config,
    build_tiny_model,
    greedy_accuracy,
    resolve_model_path,
    sft_loss,
    sft_warm_start,
)
from lit_gcpo.tasks.arithmetic import DEFAULT_MIX, arithmetic_splits, sample_problems

# Greedy accuracy of this architecture on DEFAULT_MIX validation rows when the warm start runs 1500 steps
# instead of 200 (`scripts/build_tiny_model.py --steps 1500`, measured 0.882 on 400 rows). The shipped policy
# is meant to sit far below it (0.23 measured on 400 rows), leaving room for RL.
CEILING = 0.88


def _task_texts(n: int = 2000) -> list[str]:
    problems = sample_problems(n, {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}, seed=11)
    return [p.prompt + p.solution for p in problems]


def test_tokenizer_round_trips_every_task_text_losslessly() -> None:
    tokenizer = build_char_tokenizer()
    unk = tokenizer.unk_token_id
    for text in _task_texts():
        ids = tokenizer(text)["input_ids"]
        assert unk not in ids
        # One token per character except the box marker, which is one token for 7 characters.
        assert len(ids) == len(text) - 6 * text.count(BOX_TOKEN)
        assert tokenizer.decode(ids) == text
    ids = tokenizer("3+4=\\boxed{7}")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["3", "+", "4", "=", BOX_TOKEN, "7", "}"]
    assert ids == [VOCAB.index(token) for token in ["3", "+", "4", "=", BOX_TOKEN, "7", "}"]]
    # No BOS/EOS is added, so add_special_tokens does not change the ids (transformers and vLLM agree).
    assert tokenizer("7*8=", add_special_tokens=False)["input_ids"] == tokenizer("7*8=")["input_ids"]
    assert tokenizer.decode([*ids, tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == (
        "3+4=\\boxed{7}"
    )
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, unk}) == 4


def test_tokenizer_and_model_round_trip_through_a_directory(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(seed=3)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    for text in _task_texts(300):
        assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert (loaded_tokenizer.pad_token_id, loaded_tokenizer.eos_token_id) == (0, 2)
    assert isinstance(loaded_model, LlamaForCausalLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[name], tensor), name


def test_build_tiny_model_depends_only_on_the_seed() -> None:
    config = build_tiny_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    assert config.vocab_size == len(VOCAB) == len(build_char_tokenizer())
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    first, again, other = (build_tiny_model(config, seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the global RNG is untouched
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_resolve_model_path() -> None:
    assert resolve_model_path(TINY_MODEL_NAME) == TINY_MODEL_PATH
    assert resolve_model_path("/some/other/model") == "/some/other/model"
    assert Path(TINY_MODEL_PATH).is_dir()


def test_sft_loss_matches_a_plain_per_token_loop() -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(build_tiny_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    prompts, completions = ["3+4*2=", "7="], ["3+8=\\boxed{11}", "\\boxed{7}"]
    loss = sft_loss(model, tokenizer, prompts, completions)
    # Reference: each example alone, unpadded; sum -log p(token | prefix) over the completion and EOS,
    # divided by the total number of completion tokens of the batch: "3+8=" 4, box 1, "11}" 3, EOS 1 = 9,
    # and box, "7}", EOS = 4: 13.
    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)  # [L, V]
        for position in range(len(prompt_ids), len(ids)):
            total -= log_probs[position - 1, ids[position]].item()
            count += 1
    assert count == 13
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_warm_start_is_bitwise_deterministic_and_changes_every_weight() -> None:
    tokenizer = build_char_tokenizer()
    problems = sample_problems(3 * 8, DEFAULT_MIX, seed=0)

    def build() -> dict[str, torch.Tensor]:
        model = build_tiny_model(seed=0)
        sft_warm_start(model, tokenizer, problems, steps=3, batch_size=8, lr=3e-3, warmup_steps=1)
        return model.state_dict()

    initial = build_tiny_model(seed=0).state_dict()
    with torch.inference_mode(False):
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            first, second = build(), build()
        finally:
            torch.use_deterministic_algorithms(deterministic)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert not torch.equal(first[name], initial[name]), name
    with pytest.raises(ValueError, match="steps \\* batch_size = 24"):
        sft_warm_start(build_tiny_model(), tokenizer, problems[:5], steps=3, batch_size=8)


def test_boxed_answer_reads_the_last_box_only() -> None:
    assert boxed_answer("3+8=\\boxed{11}") == "11"
    assert boxed_answer("\\boxed{1}=\\boxed{ -2 }") == "-2"
    assert boxed_answer("\\boxed{12") is None
    assert boxed_answer("12") is None


def test_shipped_model_loads_offline_and_is_between_zero_and_the_ceiling() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH)
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    assert json.loads((Path(TINY_MODEL_PATH) / "config.json").read_text())["model_type"] == "llama"
    _, val_rows = arithmetic_splits(0, 200, seed=0)
    per_level = greedy_accuracy(model, tokenizer, val_rows)
    accuracy = sum(correct for correct, _ in per_level.values()) / len(val_rows)
    assert 0.10 < accuracy < CEILING / 2, per_level
    # The hardest level is hardest: level 4 below level 2.
    assert per_level[4][0] / per_level[4][1] < per_level[2][0] / per_level[2][1], per_level
