"""Turning B prompts into a scored RolloutBatch: generate G completions each, decode, reward, pack.

Kept apart from the DataModule so that it can be driven without a Trainer (benchmarks, evaluation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from lit_gcpo.algorithms.clustering import MissingVerdicts, answer_clusters
from lit_gcpo.data.batch import PromptBatch, RolloutBatch
from lit_gcpo.engines.base import RolloutEngine, SamplingConfig
from lit_gcpo.rewards.answers import final_answer


def pack_sequences(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts, right-pad completions: ``input_ids``/``attention_mask`` ``[N, P + L]``, mask ``[N, L]``."""
    n = len(completion_ids)
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids])  # [N]
    completion_lengths = torch.tensor([len(c) for c in completion_ids])  # [N]
    width_p, width_c = int(prompt_lengths.max()), max(1, int(completion_lengths.max()))
    prompt_mask = torch.arange(width_p) >= width_p - prompt_lengths.unsqueeze(-1)  # [N, P], on the right
    completion_mask = torch.arange(width_c) < completion_lengths.unsqueeze(-1)  # [N, L], on the left
    input_ids = torch.full((n, width_p + width_c), pad_token_id, dtype=torch.long)  # [N, P + L]
    # a boolean-mask assignment fills row by row, left to right: the rows' tokens in order
    input_ids[:, :width_p][prompt_mask] = torch.tensor([t for p in prompt_ids for t in p], dtype=torch.long)
    input_ids[:, width_p:][completion_mask] = torch.tensor([t for c in completion_ids for t in c], dtype=torch.long)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1).long()  # [N, P + L]
    return input_ids.to(device), attention_mask.to(device), completion_mask.float().to(device)


def pad_right(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """``rows`` (one list of values per row, as long as the row's ones in ``mask``) as a ``[N, L]`` float32 tensor
    shaped like ``mask``, 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32)  # [N, L]
    out[mask.bool().cpu()] = torch.tensor([v for row in rows for v in row], dtype=torch.float32)
    return out


class RolloutCollector:
    """Generates, decodes and rewards groups of completions.

    Args:
        engine: the rollout engine.
        tokenizer: the policy's tokenizer.
        rewards: scores completions (``lit_gcpo.rewards.RewardSet``).
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) to the rendered prompts.
        accuracy_reward: the reward whose value above 0.5 marks a completion correct (``batch.correct``); None: none.
        policy_precision: the policy's precision context (``RolloutPolicy.precision_context``: autocast under
            bf16-mixed). An engine that samples with the trained policy itself (``samples_from_policy``, for which
            no rollout correction applies) generates in it, so that it samples from the very distribution the
            scoring and training passes compute; with the fp32 weights outside autocast it sampled from another
            (per-token log-prob gaps up to 0.08 on the tiny test policy). None: no context.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        rewards: Any,
        add_special_tokens: bool = True,
        accuracy_reward: str | None = None,
        policy_precision: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.add_special_tokens = add_special_tokens
        self.accuracy_reward = accuracy_reward
        self.policy_precision = policy_precision if engine.samples_from_policy else None
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @contextlib.contextmanager
    def _sampling_context(self) -> Iterator[None]:
        """The policy's precision context (``policy_precision``) with torch's default dtype kept: under bf16-true
        Lightning's context makes bf16 the default dtype, which would turn the engine's own float buffers (pooled
        embeddings) into bf16, while the weights are bf16 already and compute alike either way."""
        if self.policy_precision is None:
            yield
            return
        default = torch.get_default_dtype()
        with self.policy_precision():
            torch.set_default_dtype(default)  # the context puts back its own on exit
            yield

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"] for p in prompts]

    def collect(
        self,
        batch: PromptBatch,
        group_size: int,
        sampling: SamplingConfig,
        device: torch.device,
        seeds: list[int] | None = None,
        with_embeddings: bool = False,
        rewards: Any = None,
    ) -> RolloutBatch:
        """``group_size`` scored completions of each prompt; ``seeds`` (one per prompt) seed their sampling;
        ``with_embeddings``: the engine's completion embeddings, when it reports them (else left to the module);
        ``rewards``: the reward set of this batch (default: the collector's; label-free training has its own).
        The batch carries how it was sampled (temperature, ``max_new_tokens``, whether by the policy itself) and
        each completion's correctness: what training reads besides the completions."""
        prompt_ids = self.tokenize(batch.prompts)
        start = time.perf_counter()
        extra = {"with_embeddings": True} if with_embeddings and self.engine.reports_embeddings else {}
        with self._sampling_context():
            generation = self.engine.generate(prompt_ids, group_size, sampling, seeds=seeds, **extra)
        generate_s = time.perf_counter() - start
        completions = self.tokenizer.batch_decode(generation.completion_ids, skip_special_tokens=True)

        expanded_rows = [row for row in batch.rows for _ in range(group_size)]  # [N], group-major
        expanded_prompts = [p for p in batch.prompts for _ in range(group_size)]
        start = time.perf_counter()
        scores = (self.rewards if rewards is None else rewards).score(expanded_prompts, completions, expanded_rows)
        reward_s = time.perf_counter() - start

        input_ids, attention_mask, completion_mask = pack_sequences(
            [p for p in prompt_ids for _ in range(group_size)],
            generation.completion_ids,
            self.pad_token_id,
            device,
        )
        engine_logprobs = None
        if generation.logprobs is not None:
            engine_logprobs = pad_right(generation.logprobs, completion_mask)  # [N, L]
        lengths = completion_mask.sum(-1)  # [N]
        new_tokens = float(lengths.sum())
        metrics = {
            "time/generate_s": generate_s,
            "time/reward_s": reward_s,
            "rollout/tokens_per_s": new_tokens / max(generate_s, 1e-9),
            "completion/length_mean": float(lengths.mean()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": sum(generation.truncated) / len(generation.truncated),
            **scores.metrics,
        }
        components = {name: value.to(device) for name, value in scores.components.items()}
        correct = None
        if self.accuracy_reward is not None and self.accuracy_reward in components:
            correct = (components[self.accuracy_reward].nan_to_num(0.0) > 0.5).float()  # [N]
        return RolloutBatch(
            prompts=list(batch.prompts),
            rows=list(batch.rows),
            completions=completions,
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            group_ids=torch.arange(len(batch), device=device).repeat_interleave(group_size),
            rewards=scores.total.to(device),
            reward_components=components,
            truncated=torch.tensor(generation.truncated, device=device),
            answers=[final_answer(text) for text in completions],
            engine_logprobs=None if engine_logprobs is None else engine_logprobs.to(device),
            embeddings=None if generation.embeddings is None else generation.embeddings.to(device),
            temperature=sampling.temperature,
            max_new_tokens=sampling.max_new_tokens,
            samples_from_policy=self.engine.samples_from_policy,
            correct=correct,
            metrics=metrics,
        )


def timed_answer_clusters(
    answers: list[str | None] | None, group_ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """``answer_clusters`` of a batch's answers (run in the clustering thread) and its metrics: the seconds they took
    and ``rollout/answer_cluster_failures``, the comparisons Math-Verify gave no verdict on (each answer pair once a
    batch; taken as not equivalent), which one warning also names with their completions and groups."""
    start = time.perf_counter()
    missing = MissingVerdicts(group_ids.tolist())
    clusters = answer_clusters(answers or [], group_ids, on_no_verdict=missing)
    missing.warn()
    metrics = {"time/answer_clusters_s": time.perf_counter() - start, "rollout/answer_cluster_failures": len(missing)}
    return clusters, {name: float(value) for name, value in metrics.items()}
