"""The data that flows from the rollout DataModule to the module and the callbacks.

Completions are stored flat and group-major: completion ``n`` belongs to prompt ``group_ids[n]`` and the
G completions of a prompt are contiguous. ``N = B * G`` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lit_gcpo.engines.base import logprob_temperature

OPTIONAL_FIELDS = (
    "old_logprobs",
    "seq_logprobs",
    "embeddings",
    "answer_clusters",
    "token_entropy",
    "token_mean_logprob",
)
"""The fields of a ``RolloutBatch`` that may cost work of their own (a scoring forward pass of the policy,
math-verify clustering) and are filled only when something reads them. ``seq_logprobs`` and ``embeddings`` come
from the engine when it reports them (the ``hf`` engine: the policy itself), else from the scoring pass;
``token_entropy`` and ``token_mean_logprob`` always from the scoring pass (the trainer's policy, whatever the
engine), both at once."""


COUNT_SUFFIXES = ("_failures", "_timeouts", "_none", "_invalid", "_truncated")
"""A ``RolloutBatch.metrics`` name that ends with one of these counts events of this rank's completions (the
rewards' failures, a reward model's truncated texts, ``rollout/answer_cluster_failures``): summed over the rounds of
a step (dynamic sampling) and over the data-parallel ranks when logged, where the other metrics are averaged."""


def requested_fields(callbacks: Iterable[Any], stage: str) -> set[str]:
    """The optional fields that ``callbacks`` read from the batches of ``stage`` (``train``, ``val``, ``test``,
    ``predict``): the union of each callback's ``rollout_fields(stage)``.

    A callback without ``rollout_fields`` reads none of them. The rollout pipeline fills the optional fields only
    when asked (on-policy training needs no scoring pass otherwise), so a callback of your own that reads
    ``embeddings``, ``old_logprobs``/``seq_logprobs`` or ``answer_clusters`` declares it with such a method.
    """
    requested: set[str] = set()
    for callback in callbacks:
        declare = getattr(callback, "rollout_fields", None)
        if declare is not None:
            wanted = set(declare(stage))
            unknown = wanted - set(OPTIONAL_FIELDS)
            if unknown:
                raise ValueError(
                    f"{type(callback).__name__}.rollout_fields({stage!r}) names {sorted(unknown)}; "
                    f"optional fields are {', '.join(OPTIONAL_FIELDS)}"
                )
            requested |= wanted
    return requested


@dataclass
class PromptBatch:
    """B prompts as the train dataloader yields them (cheap: generation happens at step time).

    Attributes:
        prompts: the rendered prompt texts, ``[B]``.
        rows: the dataset rows the prompts came from (gold answers and any other columns), ``[B]``.
        indices: the rows' positions in the prompt source, ``[B]``.
        positions: where each prompt is in its stream, ``[B]``: for training the global position in the endless
            shuffled stream (the same whatever the batch size and number of ranks), for evaluation the row's
            index. The sampler seeds each prompt from it, so a prompt's completions do not depend on its batch.
    """

    prompts: list[str]
    rows: list[dict[str, Any]]
    indices: list[int]
    positions: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RolloutBatch:
    """One step's groups of completions, scored.

    Tensor shapes (``N`` completions, ``P`` prompt columns, ``L`` completion columns):

    Attributes:
        prompts: prompt texts, ``[B]``.
        rows: dataset rows of the prompts, ``[B]``.
        completions: decoded completion texts, ``[N]``.
        input_ids: prompt (left-padded) followed by completion (right-padded), ``[N, P + L]`` long.
        attention_mask: 1 on real prompt and completion tokens, ``[N, P + L]`` long.
        completion_mask: 1 on completion tokens (EOS included), 0 on padding, ``[N, L]`` float.
        group_ids: prompt index of each completion, ``[N]`` long, values in ``[0, B)``.
        rewards: total reward, ``[N]`` float; NaN where every reward function failed.
        reward_components: each reward function's score by name, ``[N]`` float each (NaN = failed).
        truncated: completion hit the token limit without EOS, ``[N]`` bool.
        answers: extracted final answers (None when there is none), ``[N]``.
        answer_clusters: clusters of mathematically equivalent ``answers`` within each group (ids local to
            the group; a missing answer is a singleton), ``[N]`` long, or None.
        engine_logprobs: sampled-token log-probs reported by the rollout engine, ``[N, L]`` or None.
        old_logprobs: the trainer's log-probs of the sampled tokens under the generating policy, ``[N, L]``.
        ref_logprobs: the frozen reference model's log-probs, ``[N, L]`` or None when beta = 0.
        embeddings: one vector per completion for geometric uncertainty, ``[N, d]`` or None.
        token_entropy: entropy of the trainer's policy distribution at each completion position, at
            ``logprob_temperature`` (the loss's), ``[N, L]`` float32 or None; from the scoring pass, never the
            engine's, so with vLLM too it is the distribution the loss trains.
        token_mean_logprob: mean over the vocabulary of that distribution's log-probs, ``(1/V) sum_v log p_t(v)``,
            ``[N, L]`` or None (self-certainty is ``-log V - token_mean_logprob``).
        vocab_size: V, the size of that distribution's support (the policy's lm-head rows), set with
            ``token_mean_logprob``.
        advantage_weights: per-completion multiplier of the advantages written by the uncertainty
            callback (the weight of the completion's group), ``[N]`` or None (= all ones).
        temperature: the temperature the completions were sampled at (0: greedy), stamped by the collector; the
            loss recomputes their log-probs at ``logprob_temperature``.
        max_new_tokens: the completion length limit ``L_max`` they were sampled with (None: not known).
        samples_from_policy: whether the engine sampled from the trained policy itself (``hf``); when not (vLLM),
            its ``engine_logprobs`` may differ from the trainer's and the loss corrects for it.
        correct: ``[N]`` float, 1 where the accuracy reward judged the completion correct (above 0.5), or None
            when the batch has no accuracy reward.
        metrics: scalars measured while building the batch (timings, reward failures), logged by the module:
            averaged over the data-parallel ranks, counts (``COUNT_SUFFIXES``) summed.
    """

    prompts: list[str]
    rows: list[dict[str, Any]]
    completions: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    truncated: torch.Tensor | None = None
    answers: list[str | None] | None = None
    answer_clusters: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None
    token_mean_logprob: torch.Tensor | None = None
    vocab_size: int | None = None
    advantage_weights: torch.Tensor | None = None
    temperature: float = 1.0
    max_new_tokens: int | None = None
    samples_from_policy: bool = True
    correct: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    # Mapping-style access, so that callbacks written against a plain dict batch work on this too.
    def __getitem__(self, key: str) -> Any:
        if key == "seq_logprobs":
            return self.seq_logprobs
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._field_names():
            raise KeyError(f"RolloutBatch has no field {key!r}; fields: {sorted(self._field_names())}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        if key == "seq_logprobs":
            return self.seq_logprobs is not None
        return key in self._field_names() and getattr(self, str(key)) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (this is the mapping)

    def keys(self) -> Iterator[str]:
        return iter(name for name in self._field_names() if getattr(self, name) is not None)

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def num_completions(self) -> int:
        return int(self.group_ids.numel())

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    @property
    def completion_ids(self) -> torch.Tensor:
        """``[N, L]`` the completion tokens (padding where ``completion_mask`` is 0)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def logprob_temperature(self) -> float:
        """The temperature whose distribution ``old_logprobs`` and the loss use (``lit_gcpo.engines.base.
        logprob_temperature``: 1 for greedy sampling)."""
        return logprob_temperature(self.temperature)

    @property
    def seq_logprobs(self) -> torch.Tensor | None:
        """``[N]`` length-normalised sequence log-likelihoods of the generating policy (METHODS.md §4): from the
        trainer's ``old_logprobs`` when the batch has them, else from the engine's own (the distribution the
        completions were drawn from)."""
        token_logprobs = self.old_logprobs if self.old_logprobs is not None else self.engine_logprobs
        if token_logprobs is None:
            return None
        lengths = self.completion_mask.sum(-1).clamp(min=1)
        return (token_logprobs * self.completion_mask).sum(-1) / lengths
