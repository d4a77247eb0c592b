"""A learned reward model as a reward: one score per (prompt, completion) from a sequence-classification head.

The model is any ``AutoModelForSequenceClassification`` with one output (``num_labels == 1``: the scalar head of
Bradley-Terry reward models, e.g. Skywork-Reward, InternLM2-Reward, the reward models OpenRLHF and verl train) with
its own tokenizer. It is given in ``data.rewards`` beside the reward functions, as a class::

    rewards:
      - math_accuracy_final
      - class_path: lit_gcpo.rewards.RewardModel
        init_args: {path: Skywork/Skywork-Reward-V2-Qwen3-0.6B, batch_size: 16}
    reward_weights: [1.0, 0.5]

What it computes (TRL's ``GRPOTrainer`` with a reward-model ``reward_funcs`` entry does the same; where it
differs is said):

- Text: with ``format: chat`` (or ``auto`` and a tokenizer with a chat template) the conversation
  ``[user: prompt, assistant: completion]`` through the reward model's chat template, tokenized without adding
  special tokens (the template writes them); with ``plain`` the prompt followed by the completion, tokenized with
  the tokenizer's special tokens (TRL adds none there; a BERT- or Llama-style reward model expects its CLS / BOS).
  ``prompt`` is the prompt the policy saw, or the row's field ``prompt_field`` (the question alone: the policy's
  prompt carries the policy's own chat markup when the DataModule applied its chat template, a warning says so).
- Length: a text longer than ``max_length`` tokens keeps its last ``max_length`` (``truncation_side: left``, the
  default: the end of the completion, where a reward model's head reads) or its first ones; each batch counts its
  truncated texts (``reward/<name>_truncated``) and the first one is warned about (project's choice: TRL does not
  truncate, a text past the model's positions fails there).
- Batches of ``batch_size`` texts, longest first, padded on the right whatever the tokenizer's padding side (the
  sequence-classification head reads the last non-pad token either way; right padding keeps the positions of a
  text alone, so a score does not depend on its batch), under ``torch.inference_mode`` and without autocast (the
  model computes in its own ``dtype``: ``auto`` is bfloat16 on a GPU, float32 elsewhere). A tokenizer without a
  pad token pads with EOS (as TRL does).

Where it runs: loaded once per process by ``load`` (the DataModule calls it in ``setup`` with the trainer's device,
each data-parallel rank its own copy, scoring its own completions), then called by ``RewardSet`` in the process and
thread that collects the rollout, with no timeout: the weights are trusted, not user code (a user's reward
*function* runs in a killable child process, ``lit_gcpo.rewards.isolated``), so an error in it (out of memory, a
wrong path) stops the run instead of being counted as a failed reward. It never reads a gold answer: allowed in
label-free training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import PositiveInt

from lit_gcpo.rewards.math_reward import completion_text

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNBOUNDED = 10**9  # tokenizers without a known limit report model_max_length as ~1e30


def default_name(path: str) -> str:
    """The name a reward model is logged under when none is given: the last part of its path or hub id (TRL's)."""
    return Path(str(path).rstrip("/")).name or str(path)


class RewardModel:
    """A sequence-classification reward model scoring (prompt, completion) pairs; see the module docstring.

    Args:
        path: local directory or hub id of an ``AutoModelForSequenceClassification`` with ``num_labels == 1``.
        tokenizer: its tokenizer's directory or hub id; None: ``path``'s.
        name: the reward's name in the logs (``reward/<name>_mean``) and in ``accuracy_reward`` /
            ``dynamic_sampling.reward``; None: the last part of ``path``.
        format: ``chat`` (the tokenizer's chat template, user = prompt, assistant = completion), ``plain`` (prompt +
            completion) or ``auto`` (chat when the tokenizer has a template).
        prompt_field: the row field whose text is the prompt the reward model sees (e.g. ``problem``); None: the
            prompt the policy saw.
        max_length: tokens kept of a longer text; None: the tokenizer's ``model_max_length``, else the model's
            ``max_position_embeddings``.
        truncation_side: which tokens a longer text keeps: ``left`` drops its start (keeps the completion's end),
            ``right`` its end.
        batch_size: texts per forward pass.
        dtype: the weights' dtype; ``auto``: bfloat16 on a GPU, float32 elsewhere.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        name: str | None = None,
        format: Literal["auto", "chat", "plain"] = "auto",
        prompt_field: str | None = None,
        max_length: PositiveInt | None = None,
        truncation_side: Literal["left", "right"] = "left",
        batch_size: PositiveInt = 8,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    ) -> None:
        from transformers import AutoConfig

        if format not in ("auto", "chat", "plain"):
            raise ValueError(f"RewardModel format must be 'auto', 'chat' or 'plain', got {format!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"RewardModel truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"RewardModel dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        for option, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value is not None and int(value) < 1:
                raise ValueError(f"RewardModel {option} must be >= 1, got {value}")
        self.path, self.tokenizer_path, self.given_name = str(path), str(tokenizer or path), name
        self.name = name or default_name(self.path)
        self.format, self.prompt_field, self.truncation_side = format, prompt_field, truncation_side
        self.max_length = None if max_length is None else int(max_length)  # plain ints: a checkpoint stores them
        self.batch_size, self.dtype = int(batch_size), dtype
        config = AutoConfig.from_pretrained(self.path)  # a config file: refuse a wrong model before any weight loads
        if config.num_labels != 1:
            raise ValueError(
                f"data.rewards: the reward model {self.name!r} (path {self.path!r}) has num_labels "
                f"{config.num_labels}; a reward model gives one score per completion: an "
                "AutoModelForSequenceClassification with num_labels 1 (a causal LM or a classifier checkpoint without "
                "such a head loads with the default 2)"
            )
        self.model: Any = None  # from load() on: the model, its tokenizer, device, chat formatting and token limit
        self.tokenizer: Any = None
        self.device: torch.device | None = None
        self.use_chat, self.limit = False, _UNBOUNDED
        self.last_metrics: dict[str, float] = {}  # of the last call: RewardSet logs them as reward/<name>_<key>
        self._warned_truncation = False

    def init_args(self) -> dict[str, Any]:
        """The options as given (what a checkpoint's data settings record and a resumed run's config is compared
        with)."""
        tokenizer = None if self.tokenizer_path == self.path else self.tokenizer_path
        return {
            "path": self.path, "tokenizer": tokenizer, "name": self.given_name, "format": self.format,
            "prompt_field": self.prompt_field, "max_length": self.max_length, "truncation_side": self.truncation_side,
            "batch_size": self.batch_size, "dtype": self.dtype,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"RewardModel({self.name!r}, path={self.path!r})"

    # ----------------------------------------------------------------------------------------- loading
    def load(self, device: torch.device | str, prompts_use_chat: bool = False) -> None:
        """Load the weights and tokenizer onto ``device`` (once: a later call with the same device does nothing).
        ``prompts_use_chat``: the policy's prompts are rendered with the policy's chat template (a warning when they
        would be wrapped in the reward model's own template too)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = torch.device(device)
        if self.model is not None and self.device == device:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if self.format == "chat" and not has_template:
            raise ValueError(f"reward model {self.name!r}: format 'chat' but its tokenizer has no chat template")
        self.use_chat = self.format == "chat" or (self.format == "auto" and has_template)
        dtype = _DTYPES.get(self.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id  # the head finds each text's last token by it
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.limit = self.max_length or self._model_limit()
        if prompts_use_chat and self.use_chat and self.prompt_field is None:
            log.warning(
                "reward model %r: the policy's prompts carry the policy's chat template and are wrapped in the reward "
                "model's as the user message; set its prompt_field to the row field of the question",
                self.name,
            )

    def _model_limit(self) -> int:
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < _UNBOUNDED:
            return limit
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return int(positions) if isinstance(positions, int) and positions > 0 else _UNBOUNDED

    # ----------------------------------------------------------------------------------------- scoring
    def texts(self, prompts: Sequence[str], completions: Sequence[Any], **columns: list[Any]) -> list[str]:
        """The text the reward model reads for each (prompt, completion) (``load`` first: it reads the tokenizer)."""
        if self.prompt_field is not None:
            values = columns.get(self.prompt_field)
            if values is None:
                raise ValueError(f"reward model {self.name!r}: prompt_field {self.prompt_field!r} is not a row field")
            prompts = [str(value) for value in values]
        pairs = [
            (str(prompt), completion_text(completion)) for prompt, completion in zip(prompts, completions, strict=True)
        ]
        if not self.use_chat:
            return [prompt + completion for prompt, completion in pairs]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
            )
            for prompt, completion in pairs
        ]

    def token_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Each text's token ids, truncated to the limit, and how many were truncated."""
        encoded = self.tokenizer(list(texts), add_special_tokens=not self.use_chat)["input_ids"]
        limit, truncated = self.limit, sum(len(ids) > self.limit for ids in encoded)
        if self.truncation_side == "left":
            return [ids[-limit:] for ids in encoded], truncated
        return [ids[:limit] for ids in encoded], truncated

    def __call__(self, prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float]:
        """One score per completion: the head's output on its text (the reward-function convention)."""
        if self.model is None:
            raise RuntimeError(f"reward model {self.name!r} is not loaded: call load(device) first")
        encoded, truncated = self.token_ids(self.texts(prompts, completions, **columns))
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            log.warning(
                "reward model %r: %d of %d texts are longer than max_length %d tokens and were truncated on the %s "
                "(counted in reward/%s_truncated; warned once)",
                self.name, truncated, len(encoded), self.limit, self.truncation_side, self.name,
            )  # fmt: skip
        scores = [math.nan] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            for row, score in zip(rows, self._forward([encoded[i] for i in rows]), strict=True):
                scores[row] = score
        self.last_metrics = {"truncated": float(truncated)}
        return scores

    def _forward(self, batch: list[list[int]]) -> list[float]:
        padded = self.tokenizer.pad({"input_ids": batch}, padding_side="right", return_tensors="pt")
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            logits = self.model(
                input_ids=padded["input_ids"].to(self.device),  # [b, L]
                attention_mask=padded["attention_mask"].to(self.device),  # [b, L]
            ).logits  # [b, 1]
        return logits[:, 0].float().tolist()


def load_reward_models(specs: Sequence[Any], device: torch.device | str, prompts_use_chat: bool = False) -> None:
    """Load the reward models among the ``data.rewards`` entries ``specs`` onto ``device`` (``RewardModel.load``)."""
    for spec in specs:
        if isinstance(spec, RewardModel):
            spec.load(device, prompts_use_chat=prompts_use_chat)


def reward_name(spec: Any) -> str:
    """The name of a ``data.rewards`` entry: a function's name or path, a ``RewardModel``'s ``name``, or the name
    a not yet built one (a ``class_path`` / ``init_args`` mapping, as the CLI holds it while parsing) will have."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, RewardModel):
        return spec.name
    plain = spec.as_dict() if hasattr(spec, "as_dict") else spec
    if isinstance(plain, Mapping) and "class_path" in plain:
        init_args = plain.get("init_args") or {}
        return init_args.get("name") or default_name(init_args.get("path", plain["class_path"]))
    raise TypeError(f"data.rewards: an entry must be a reward name, a dotted path or a RewardModel, got {spec!r}")


def reward_setting(spec: Any) -> Any:
    """A ``data.rewards`` entry as plain data (a checkpoint stores it; a resumed run compares it with its config)."""
    if isinstance(spec, RewardModel):
        return {"class_path": "lit_gcpo.rewards.RewardModel", "init_args": spec.init_args()}  # as the README writes it
    return str(spec)
