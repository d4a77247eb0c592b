"""The rollout-engine interface: generate G completions per prompt, and receive the policy's weights.

Engines are chosen by name (``hf``, ``vllm``) and imported lazily, so that ``vllm`` is only needed
when it is used.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass.
        top_k: keep the k most likely tokens; -1 disables.
        max_new_tokens: the completion length limit ``L_max``.
        stop: strings that end a completion (the stop string is kept in the text).
        seed: base seed of the engine's sampler; None leaves it to the engine.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Generation:
    """What an engine returns for ``len(prompts) * num_samples`` completions, group-major.

    Attributes:
        completion_ids: token ids of each completion, EOS included when it was sampled.
        logprobs: the engine's log-probability of each sampled token (same lengths), or None. It is the
            log-probability under the temperature-scaled distribution ``log_softmax(logits / T)``, before
            top-k/top-p truncation, which is what the trainer recomputes (T = 1 for greedy decoding).
        truncated: True where the completion hit ``max_new_tokens`` without EOS or a stop string.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    truncated: list[bool]


class RolloutEngine(abc.ABC):
    """Generates completions for the trainer and follows the trainer's weights.

    Attributes:
        samples_from_policy: True when the engine generates with the trained module itself (``hf``), so its
            log-probs are the trainer's and need no importance correction.
    """

    samples_from_policy: bool = False

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], num_samples: int, sampling: SamplingConfig) -> Generation:
        """Sample ``num_samples`` completions for each tokenised prompt (group-major output)."""

    @abc.abstractmethod
    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights (Hugging Face names) into the engine, from memory."""

    def sleep(self) -> None:
        """Release accelerator memory while the trainer steps (engines without such a mode do nothing)."""
        return None
