"""The rollout-engine interface: generate G completions per prompt, and receive the policy's weights.

Engines are chosen by name (``hf``, ``vllm``) and imported lazily, so that ``vllm`` is only needed
when it is used.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass.
        top_k: keep the k most likely tokens; -1 disables.
        max_new_tokens: the completion length limit ``L_max``.
        min_tokens: the completion tokens sampled before one may end it (vLLM's ``SamplingParams.min_tokens``,
            transformers' ``min_new_tokens``): tokens ``0 .. min_tokens - 1`` are never an end-of-sequence id and
            never complete a stop string, so a completion that ends has at least ``min_tokens + 1`` tokens and one
            that does not has ``max_new_tokens``. ``max_new_tokens``: every completion has exactly that many. The
            engines report log-probs of the distribution they sampled from (the end-of-sequence ids at -inf);
            the trainer's own log-probs are the policy's (see :class:`Generation`). 0 (the default): off.
        stop: strings that end a completion (the stop string is kept in the text).
        seed: base seed of the engine's sampler when the caller gives no per-prompt seeds: prompt ``i`` of a
            call then gets the seed derived from ``(seed, i)``. None leaves it to the engine.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(
                f"sampling.min_tokens must be in [0, max_new_tokens] = [0, {self.max_new_tokens}], "
                f"got {self.min_tokens}"
            )


def logprob_temperature(temperature: float) -> float:
    """The temperature T of the distribution ``log_softmax(logits / T)`` that log-probs of completions sampled at
    ``temperature`` are computed under, by engines and by the trainer alike: the sampling temperature, and 1 for
    greedy decoding (temperature 0, whose "distribution" would be a point mass)."""
    return temperature if temperature > 0 else 1.0


@dataclass
class Generation:
    """What an engine returns for ``len(prompts) * num_samples`` completions, group-major.

    Attributes:
        completion_ids: token ids of each completion, EOS included when it was sampled.
        logprobs: the engine's log-probability of each sampled token (same lengths), or None. It is the
            log-probability under the temperature-scaled distribution ``log_softmax(logits / T)``, before
            top-k/top-p truncation, which is what the trainer recomputes (T = 1 for greedy decoding). Under
            ``min_tokens``, a token sampled while the end-of-sequence ids are suppressed has the log-prob of that
            distribution, ``log_softmax`` with those logits at -inf (the one sampled from; vLLM's
            ``processed_logprobs``): ``log p - log(1 - p_eos)`` of the trainer's ``log p``.
        truncated: True where the completion hit ``max_new_tokens`` without EOS or a stop string.
        embeddings: ``[n, H]`` each completion's final hidden state averaged over its tokens, when asked of an
            engine that ``reports_embeddings``; None otherwise.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    truncated: list[bool]
    embeddings: torch.Tensor | None = None


def prompt_seeds(sampling: SamplingConfig, num_prompts: int, seeds: list[int] | None) -> list[int | None]:
    """One seed per prompt: the caller's ``seeds``, else derived from ``(sampling.seed, position in the call)``,
    else None (the engine's own stream)."""
    if seeds is not None:
        if len(seeds) != num_prompts:
            raise ValueError(f"seeds has {len(seeds)} entries for {num_prompts} prompts")
        return [int(s) for s in seeds]
    if sampling.seed is None:
        return [None] * num_prompts
    return [zlib.crc32(f"{sampling.seed}/{row}".encode()) for row in range(num_prompts)]


def end_of_sequence_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each id of the model's generation config
    (chat models list several, e.g. Qwen's ``<|im_end|>`` and ``<|endoftext|>``), in that order, unique."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for value in [tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an end-of-sequence id")
    return ids


class RolloutEngine(abc.ABC):
    """Generates completions for the trainer and follows the trainer's weights.

    Attributes:
        samples_from_policy: True when the engine generates with the trained module itself (``hf``), so its
            log-probs are the trainer's and need no importance correction.
        reports_embeddings: True when ``generate(..., with_embeddings=True)`` returns the completions' mean final
            hidden states (the policy's embeddings, without a scoring pass).
    """

    samples_from_policy: bool = False
    reports_embeddings: bool = False

    @abc.abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
    ) -> Generation:
        """Sample ``num_samples`` completions for each tokenised prompt (group-major output).

        ``seeds`` (one per prompt) makes a prompt's completions depend on its seed and the weights only, not on
        the batch it is in (see :func:`prompt_seeds`); every id of :func:`end_of_sequence_ids` ends a completion.
        """

    @abc.abstractmethod
    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights (Hugging Face names) into the engine, from memory."""

    def sleep(self) -> None:
        """Release accelerator memory while the trainer steps (engines without such a mode do nothing)."""
        return None

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to continue as if never stopped (kept in the DataModule's checkpoint state)."""
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict` (nothing to restore by default)."""
        del state
