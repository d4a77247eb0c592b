"""The tiny character-level Llama shipped with the package, and the builders that make such models offline.

``TINY_MODEL_PATH`` is the directory of ``lit-gcpo/tiny-arith``: a ~0.4M-parameter ``LlamaConfig`` model
warm-started by supervised fine-tuning on worked solutions of ``lit_gcpo.tasks.arithmetic`` (regenerate it
with ``scripts/build_tiny_model.py``). It is deliberately under-trained: on ``DEFAULT_MIX`` validation rows its
greedy accuracy is 0.23 while sampling 8 completions at temperature 1 finds the answer for 0.56 of the
prompts (the same model trained 1500 steps instead of 200 reaches 0.88 greedy): the gap a GRPO-family run
closes in minutes on a CPU.

The tokenizer is a ``tokenizers`` WordLevel model over single characters plus one multi-character token,
``\\boxed{``, so that the answer marker costs one generation step instead of seven. No special token is
added on encoding (no BOS): ``add_special_tokens`` then makes no difference, and a prompt encodes to the
same ids in transformers and in vLLM. EOS ends a completion and PAD (a separate id) fills batches.

Only standard files are written (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), so the
directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` and vLLM without custom code. A Llama
config is used on purpose: with a Qwen2 config ``AutoTokenizer`` swaps in Qwen2's pre-tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from lit_gcpo.tasks.arithmetic import ArithmeticProblem

TINY_MODEL_NAME = "lit-gcpo/tiny-arith"
TINY_MODEL_PATH = str(Path(__file__).resolve().parent / "tiny-arith")
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


def build_char_tokenizer(vocab_tokens: Sequence[str] = VOCAB) -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the tiny models (vocabulary ``vocab_tokens``, ids in that order; it
    must start with ``SPECIAL_TOKENS``; the default ``VOCAB`` is the arithmetic one).

    Unknown characters map to ``<unk>`` (decoding them is then lossy: the task never produces them).
    """
    if tuple(vocab_tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocab_tokens must start with {SPECIAL_TOKENS}, got {tuple(vocab_tokens[:4])}")
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
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
    vocab_tokens: Sequence[str] = VOCAB,
) -> LlamaConfig:
    """A small ``LlamaConfig`` over ``vocab_tokens`` with tied embeddings and the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=len(vocab_tokens),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=list(vocab_tokens).index(PAD_TOKEN),
        bos_token_id=list(vocab_tokens).index(BOS_TOKEN),
        eos_token_id=list(vocab_tokens).index(EOS_TOKEN),
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


def _pad_right(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(sequence) for sequence in sequences)
    padded = torch.full((len(sequences), width), value, dtype=torch.long)  # [B, L]
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return padded


def sft_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], completions: Sequence[str]
) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (EOS appended), prompts unscored."""
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    completion_ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
    pairs = list(zip(prompt_ids, completion_ids, strict=True))
    input_ids = _pad_right([p + c for p, c in pairs], tokenizer.pad_token_id)  # [B, L]
    attention_mask = _pad_right([[1] * (len(p) + len(c)) for p, c in pairs], 0)  # [B, L]
    loss_mask = _pad_right([[0] * len(p) + [1] * len(c) for p, c in pairs], 0)  # [B, L]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, L-1, V]
    targets = input_ids[:, 1:]  # [B, L-1]
    mask = loss_mask[:, 1:].float()  # [B, L-1]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L-1]
    return (nll * mask).sum() / mask.sum()


def sft_warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[ArithmeticProblem],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    seed: int = 0,
) -> list[float]:
    """Supervised fine-tuning on worked solutions, in place; returns the loss of every step.

    Batch ``k`` is ``problems[k * batch_size : (k + 1) * batch_size]`` (so ``steps * batch_size`` problems are
    needed); AdamW (betas 0.9, 0.98, no weight decay), linear warm-up then constant lr, gradient norm
    clipped to 1. Deterministic for a fixed thread count: call under ``torch.use_deterministic_algorithms``.
    """
    if len(problems) < steps * batch_size:
        raise ValueError(
            f"sft_warm_start needs steps * batch_size = {steps * batch_size} problems, got {len(problems)}"
        )
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    model.train()
    losses = []
    for step in range(steps):
        batch = problems[step * batch_size : (step + 1) * batch_size]
        loss = sft_loss(model, tokenizer, [p.prompt for p in batch], [p.solution for p in batch])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


_LAST_BOX = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (no nesting), stripped; None if there is none."""
    matches = _LAST_BOX.findall(text)
    return matches[-1].strip() if matches else None


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 24,
    batch_size: int = 256,
) -> dict[int, tuple[int, int]]:
    """Greedy-decoding correctness per level: ``{level: (correct, total)}``.

    A completion is correct when its last boxed answer equals the row's gold integer string exactly (for
    plain integers this is what a math-verify equivalence check accepts, bar spellings like ``+5``).
    """
    model.eval()
    counts: dict[int, list[int]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = tokenizer([row["prompt"] for row in chunk], return_tensors="pt", padding=True, padding_side="left")
        output = model.generate(
            **encoded,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # [b, P + L]
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, text in zip(chunk, texts, strict=True):
            tally = counts.setdefault(int(row["level"]), [0, 0])
            tally[0] += boxed_answer(text) == row["answer"]
            tally[1] += 1
    return {level: (tally[0], tally[1]) for level, tally in sorted(counts.items())}
