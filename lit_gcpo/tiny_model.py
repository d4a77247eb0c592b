"""The tiny character-level Llama shipped with the package, and the builders that make such models offline.

``TINY_MODEL_PATH`` is the directory of ``lit-gcpo/tiny-arith``: a ~0.4M-parameter ``LlamaConfig`` model
warm-started by supervised fine-tuning on worked solutions of ``lit_gcpo.tasks.arithmetic`` (regenerate it
with ``scripts/build_tiny_model.py``). It is deliberately under-trained: its greedy accuracy starts well
below what sampling 8 completions finds, which is the gap a GRPO-family run closes in minutes on a CPU.

The tokenizer is a ``tokenizers`` WordLevel model over single characters plus one multi-character token,
``\\boxed{``, so that the answer marker costs one generation step instead of seven. No special token is
added on encoding (no BOS): ``add_special_tokens`` then makes no difference, and a prompt encodes to the
same ids in transformers and in vLLM. EOS ends a completion and PAD (a separate id) fills batches.

Only standard files are written (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), so the
directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` and vLLM without custom code. A Llama
config is used on purpose: with a Qwen2 config ``AutoTokenizer`` swaps in Qwen2's pre-tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_MODEL_NAME = "lit-gcpo/tiny-arith"
TINY_MODEL_PATH = str(Path(__file__).resolve().parent / "assets" / "tiny-arith")
"""Directory of the shipped warm-started model (package data)."""

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
BOX_TOKEN = "\\boxed{"
# Every character a prompt or worked solution of the arithmetic task uses, plus a few that other tests
# may want (space, parentheses, letters of short words are not needed and would only dilute the vocab).
CHARACTERS = tuple("0123456789+-*/=(). ,}")
VOCAB: tuple[str, ...] = (*SPECIAL_TOKENS, BOX_TOKEN, *CHARACTERS)


def resolve_model_path(name_or_path: str) -> str:
    """``TINY_MODEL_PATH`` for the alias ``"lit-gcpo/tiny-arith"``, any other name or path unchanged."""
    return TINY_MODEL_PATH if name_or_path == TINY_MODEL_NAME else name_or_path


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the tiny models (vocabulary ``VOCAB``, ids in that order).

    Unknown characters map to ``<unk>`` (decoding them is then lossy: the task never produces them).
    """
    vocab = {token: index for index, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Each match becomes one token: the box marker whole, anything else one character at a time.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return tokenizer


def build_tiny_config(
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
) -> LlamaConfig:
    """A small ``LlamaConfig`` over ``VOCAB`` with tied embeddings and the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=VOCAB.index(PAD_TOKEN),
        bos_token_id=VOCAB.index(BOS_TOKEN),
        eos_token_id=VOCAB.index(EOS_TOKEN),
    )


def build_tiny_model(config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (``build_tiny_config()`` when ``config`` is None).

    The initial weights depend only on ``seed`` (the global torch RNG is left as it was).
    """
    config = build_tiny_config() if config is None else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model
