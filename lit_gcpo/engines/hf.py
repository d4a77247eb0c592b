"""The ``hf`` rollout engine: a sampling loop over the live policy's forward with its KV cache.

It generates with the very module the trainer updates, so ``sync_weights`` has nothing to do. Why a loop
of its own rather than ``model.generate``:

- **Per-prompt seeds.** Each prompt draws its random numbers from its own seeded generator (one uniform per
  sampled token, drawn up front), and a token is sampled by inverting the CDF of its distribution. A
  prompt's completions therefore depend on its seed and the weights only, not on the other prompts of the
  batch, the batch size or the number of data-parallel ranks; ``generate`` shares one RNG stream.
- **No full logits.** Each step keeps the sampled token's log-probability ``log_softmax(logits / T)``
  (before top-k/top-p, as :class:`Generation` documents) and drops the step's ``[n, V]`` logits; asking
  ``generate`` for log-probs stacks ``[n, T, V]`` (tens of GB at Qwen's vocabulary and 3000 tokens).
- **Every end-of-sequence id**: the tokenizer's and the generation config's (chat models list several).
- **Sharded policies** (FSDP2): every forward pass gathers weights from all ranks, so a rank whose
  sequences all ended keeps stepping until every rank's have.

Top-k and top-p use transformers' logits warpers, stop strings its ``StopStringCriteria``, the KV cache
its ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache
from transformers.generation import StopStringCriteria, TopKLogitsWarper, TopPLogitsWarper

from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig, end_of_sequence_ids, prompt_seeds


class HFEngine(RolloutEngine):
    """Generation with the policy's own forward pass.

    Args:
        policy: a transformers causal LM (the trained module itself).
        tokenizer: its tokenizer; ``pad_token_id`` falls back to the first end-of-sequence id.
        max_batch_size: at most this many sequences per forward pass (bounds memory); 0 = all at once.
    """

    samples_from_policy = True

    def __init__(self, policy: torch.nn.Module, tokenizer, max_batch_size: int = 0) -> None:
        if max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = end_of_sequence_ids(policy, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: the engine samples from the live policy."""

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
    ) -> Generation:
        sequences = [ids for ids in prompt_ids for _ in range(num_samples)]  # group-major
        per_prompt = prompt_seeds(sampling, len(prompt_ids), seeds)
        # completion j of prompt i draws from the seed (seed_i, j): independent of the batch it is in
        row_seeds = [None if s is None else (s, j) for s in per_prompt for j in range(num_samples)]
        chunk = self.max_batch_size or len(sequences)
        was_training = self.policy.training
        self.policy.eval()
        out = Generation(completion_ids=[], logprobs=[], truncated=[])
        try:
            for start in range(0, len(sequences), chunk):
                rows = slice(start, start + chunk)
                part = self._generate_chunk(sequences[rows], row_seeds[rows], sampling)
                out.completion_ids += part.completion_ids
                out.logprobs += part.logprobs
                out.truncated += part.truncated
        finally:
            self.policy.train(was_training)
        return out

    def _all_finished(self, finished: torch.Tensor, sharded: bool) -> bool:
        """Whether every sequence ended, on every rank when the policy is ``sharded`` (FSDP2): each forward pass
        of a sharded policy gathers weights from all ranks, so the ranks must take the same number of steps."""
        done = finished.all()
        if sharded:
            flag = done.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            done = flag.bool()
        return bool(done)

    def _uniforms(self, row_seeds: list[tuple[int, int] | None], steps: int, device: torch.device) -> torch.Tensor:
        """``[n, steps]`` uniforms in [0, 1): row ``r`` from a generator seeded by its (prompt seed, sample)."""
        rows = []
        for seed in row_seeds:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed[0] * 1_000_003 + seed[1])
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
        return torch.stack(rows).to(device)

    def _generate_chunk(
        self, sequences: list[list[int]], row_seeds: list[tuple[int, int] | None], sampling: SamplingConfig
    ) -> Generation:
        device = next(self.policy.parameters()).device
        n, width, steps = len(sequences), max(len(s) for s in sequences), sampling.max_new_tokens
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)  # [n, P]
        attention_mask = torch.zeros_like(input_ids)  # [n, P]
        for row, seq in enumerate(sequences):  # left padding, so that every row continues at the same column
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        greedy = sampling.temperature == 0
        temperature = 1.0 if greedy else sampling.temperature
        warpers = []
        if not greedy and sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if not greedy and sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        stop = StopStringCriteria(self.tokenizer, list(sampling.stop)) if sampling.stop else None
        uniforms = None if greedy else self._uniforms(row_seeds, steps, device)  # [n, T]
        eos = torch.tensor(self.eos_token_ids, device=device)
        sharded = isinstance(self.policy, FSDPModule) and torch.distributed.is_initialized()

        tokens = torch.full((n, steps), self.pad_token_id, dtype=torch.long, device=device)  # [n, T]
        logprobs = torch.zeros((n, steps), dtype=torch.float32, device=device)  # [n, T]
        lengths = torch.full((n,), steps, dtype=torch.long, device=device)  # [n], = T while running
        finished = torch.zeros(n, dtype=torch.bool, device=device)  # [n]
        cache = DynamicCache(config=self.policy.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, P], as generate() computes them
        step_ids, step_positions = input_ids, positions
        for t in range(steps):
            logits = self.policy(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]  # [n, V]
            scaled = logits.float() / temperature  # [n, V]
            log_probs = torch.log_softmax(scaled, dim=-1)  # [n, V]
            if greedy:
                token = scaled.argmax(-1)  # [n]
            else:
                for warp in warpers:
                    scaled = warp(None, scaled)
                cdf = torch.softmax(scaled, dim=-1, dtype=torch.float64).cumsum(-1)  # [n, V]
                draw = (uniforms[:, t] * cdf[:, -1]).unsqueeze(-1)  # [n, 1]
                token = torch.searchsorted(cdf, draw).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # [n]
            token = torch.where(finished, self.pad_token_id, token)
            tokens[:, t] = token
            logprobs[:, t] = log_probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
            ends = torch.isin(token, eos)
            if stop is not None:
                ends |= stop(torch.cat([input_ids, tokens[:, : t + 1]], dim=-1), None)
            newly = ends & ~finished
            lengths = torch.where(newly, t + 1, lengths)
            finished |= newly
            if self._all_finished(finished, sharded):
                break
            step_ids = token.unsqueeze(-1)  # [n, 1]
            step_positions = step_positions[:, -1:] + 1  # [n, 1]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=-1)

        lengths_list, finished_list = lengths.tolist(), finished.tolist()
        tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
        return Generation(
            completion_ids=[tokens_list[r][: lengths_list[r]] for r in range(n)],
            logprobs=[logprobs_list[r][: lengths_list[r]] for r in range(n)],
            truncated=[not f for f in finished_list],
        )
