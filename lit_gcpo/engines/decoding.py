"""The pieces of the ``hf`` engine's sampling loop (``lit_gcpo.engines.hf``): the left-padded prompt batch, the
per-row seeded token sampler and the record of what each row produced.

Sampling (see ``hf``'s docstring): row ``r`` at step ``t`` draws its token by inverting the CDF of
``softmax(warp(logits / T))`` at its own uniform ``u[r, t]`` (SplitMix64 keyed by the prompt's seed and the
sample's index), so a row's tokens depend on its seed and the weights only. The log-prob kept is that of
``log_softmax(logits / T)`` before top-k / top-p, as :class:`lit_gcpo.engines.base.Generation` documents. While
``t < sampling.min_tokens`` the end-of-sequence logits are -inf before all of it (vLLM's order: its min-tokens
processor runs before temperature and top-k / top-p), so the kept log-prob is that of the distribution sampled from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from lit_gcpo.engines.base import Generation, SamplingConfig, logprob_temperature
from lit_gcpo.engines.kv_cache import BufferedLayer, buffered_cache, gather_rows, gathers_rows
from lit_gcpo.training.scoring import base_model
from lit_gcpo.training.shared_prompts import prompt_runs

EndTest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(token [r], done [r]) -> [r]`` bool: which rows end with their new token."""
StepEndTest = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(token [r], done [r], rows [r], t) -> [r]`` bool: which of the caller's ``rows`` end with their token ``t``."""


@dataclass
class PromptBatch:
    """``n`` prompts left-padded to one width ``P``, so that every row continues at the same column.

    Attributes:
        input_ids: ``[n, P]`` the prompts, pad on the left.
        attention_mask: ``[n, P + T]`` 0 on the padding, 1 on the prompt and on every column the loop will reach
            (sliced per step: no concatenation per token).
        positions: ``[n, P]`` position ids, counted from each row's first prompt token (as ``generate`` does).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def left_padded(sequences: list[list[int]], pad_token_id: int, steps: int, device: torch.device) -> PromptBatch:
    """The :class:`PromptBatch` of ``sequences`` for a loop of ``steps`` new tokens."""
    n, width = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)  # [n, P]
    attention_mask = torch.zeros((n, width + steps), dtype=torch.long)  # [n, P + T]
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq)
        attention_mask[row, width - len(seq) :] = 1
    positions = (attention_mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [n, P]
    return PromptBatch(input_ids.to(device), attention_mask.to(device), positions.to(device))


class TokenSampler:
    """Each row's next token and its log-prob from the logits of its last column.

    Args:
        sampling: temperature (0: greedy), top-k (> 0 keeps the k most likely), top-p (< 1: the nucleus), and
            ``min_tokens``: at steps ``t < min_tokens`` the ``end_ids`` cannot be drawn (their logits -inf).
        end_ids: the end-of-sequence ids (needed when ``min_tokens`` > 0).
    """

    def __init__(self, sampling: SamplingConfig, end_ids: torch.Tensor | None = None) -> None:
        if sampling.min_tokens > 0 and (end_ids is None or end_ids.numel() == 0):
            raise ValueError("sampling.min_tokens needs the end-of-sequence ids it suppresses")
        self.min_tokens, self.end_ids = sampling.min_tokens, end_ids
        self.greedy = sampling.temperature == 0
        self.temperature = logprob_temperature(sampling.temperature)
        self.warpers = []
        if not self.greedy and sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if not self.greedy and sampling.top_p < 1:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(
        self, logits: torch.Tensor, uniforms: torch.Tensor | None, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [r, V]`` and the rows' uniforms of step ``step`` ``[r]`` -> ``(token [r], log_softmax(logits / T)
        [r, V])``, the end-of-sequence logits at -inf first while ``step < min_tokens``."""
        scaled = logits.float() / self.temperature  # [r, V], a new tensor: filled in place below
        if step < self.min_tokens:
            scaled.index_fill_(-1, self.end_ids, float("-inf"))
        log_probs = torch.log_softmax(scaled, dim=-1)  # [r, V]
        if self.greedy:
            return scaled.argmax(-1), log_probs
        for warp in self.warpers:
            scaled = warp(None, scaled)
        cdf = torch.softmax(scaled, dim=-1, dtype=torch.float64).cumsum(-1)  # [r, V]
        draw = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [r, 1]
        token = torch.searchsorted(cdf, draw).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # [r]
        return token, log_probs


class Completions:
    """What the loop produced for each of ``n`` rows (in the caller's order), written step by step.

    ``tokens`` / ``logprobs`` are ``[n, T]``; ``lengths`` is ``T`` while a row runs and its length once it ended;
    ``finished`` says it ended (end-of-sequence id or stop string) rather than reached ``T``.
    """

    def __init__(self, n: int, steps: int, pad_token_id: int, device: torch.device) -> None:
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((n, steps), pad_token_id, dtype=torch.long, device=device)  # [n, T]
        self.logprobs = torch.zeros((n, steps), dtype=torch.float32, device=device)  # [n, T]
        self.lengths = torch.full((n,), steps, dtype=torch.long, device=device)  # [n]
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)  # [n]

    def record(
        self, rows: torch.Tensor, t: int, token: torch.Tensor, log_probs: torch.Tensor, ends: EndTest
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write step ``t``'s ``token [r]`` of ``rows`` (a pad for rows that ended before) with its log-prob from
        ``log_probs [r, V]``; ``ends(token, done)`` says which rows end with it. Returns ``(done, newly, token)``:
        the rows that had ended before this step, those that end with it, and the tokens written."""
        done = self.finished[rows]  # [r]
        token = torch.where(done, self.pad_token_id, token)
        self.tokens[rows, t] = token
        self.logprobs[rows, t] = log_probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        newly = ends(token, done) & ~done  # [r]
        self.lengths[rows] = torch.where(newly, t + 1, self.lengths[rows])
        self.finished[rows] = done | newly
        return done, newly, token

    def generation(self, embeddings: torch.Tensor | None) -> Generation:
        """The rows' completions (each cut at its length), log-probs, truncation flags and ``embeddings``."""
        lengths, finished = self.lengths.tolist(), self.finished.tolist()
        tokens, logprobs = self.tokens.tolist(), self.logprobs.tolist()
        return Generation(
            completion_ids=[row[:length] for row, length in zip(tokens, lengths, strict=True)],
            logprobs=[row[:length] for row, length in zip(logprobs, lengths, strict=True)],
            truncated=[not f for f in finished],
            embeddings=embeddings,
        )


@contextlib.contextmanager
def last_hidden_states(policy: torch.nn.Module, enabled: bool, captured: list[torch.Tensor]) -> Iterator[None]:
    """While open (and ``enabled``), append to ``captured`` the decoder's final hidden state (after its last norm)
    of the last column of every forward pass of ``policy``."""
    if not enabled:
        yield
        return
    decoder = base_model(policy).get_decoder()
    hook = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state[:, -1]))
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def sdpa_step_masks_exact(policy: torch.nn.Module) -> bool:
    """Whether ``policy`` may be handed, at each decoding step, the mask sdpa gets for one query column: the rows'
    padding mask ``[r, 1, 1, columns]`` (boolean), a view of one tensor, instead of transformers building it from the
    2-D mask at every step (4-7 ms of a 64-row x 32-token generation of the tiny work's policy, about 7%). So when its
    attention is sdpa, every cache layer is full attention, and two short rows (one left-padded) give bit-equal
    logits either way (a mask function of its own would show)."""
    base = base_model(policy)
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    if not all(isinstance(layer, BufferedLayer) for layer in buffered_cache(base.config, 6).layers):
        return False
    device = next(policy.parameters()).device
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(8, device=device) * 5 + 2).remainder(vocab).view(2, 4)  # [2, P]
    mask = torch.ones(2, 5, dtype=torch.long, device=device)  # [2, P + 1]
    mask[1, :2] = 0  # the second prompt left-padded
    positions = (mask[:, :4].cumsum(-1) - 1).clamp(min=0)  # [2, P]
    logits = []
    for step_mask in (mask, mask.bool()[:, None, None, :]):
        cache = buffered_cache(base.config, 5)
        inputs = {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
        policy(input_ids=ids, attention_mask=mask[:, :4], position_ids=positions, **inputs)
        logits.append(
            policy(input_ids=ids[:, -1:], attention_mask=step_mask, position_ids=positions[:, -1:] + 1, **inputs).logits
        )
    return torch.equal(*logits)


COMPACT_SHARE = 0.25
"""Rows that need no more forward passes stay in the batch (fed a pad, their outputs unused) until they are at
least this share of it, then leave together: each leave copies the kept rows' KV cache, which at every step
where a row ends cost more than the rows' own compute (see ``SamplingLoop``)."""


class SamplingLoop:
    """The sampling loop of one chunk: step ``t`` feeds token ``t - 1`` (the prompt at ``t = 0``) and samples token
    ``t``; step ``T`` only feeds the last tokens, for their hidden states (``with_embeddings``).

    ``rows`` are the caller's rows in the cache, in its order. A row that needs no more forward passes (it ended,
    and with embeddings its last token was fed) leaves the batch and its cache with the others once they are
    ``COMPACT_SHARE`` of it (each row's numbers do not depend on the rows beside it). A sharded policy keeps
    every row: its forward passes are collectives, which every rank must make alike.

    Args:
        policy: the causal LM (eval mode, no grad).
        prompts: the left-padded prompts.
        steps: T, the most new tokens.
        sampler: draws a token per row.
        uniforms: ``[n, T]`` the rows' uniforms (None when greedy).
        completions: where the tokens go.
        ends: ``(token [r], done [r], rows [r], t) -> [r]``: which rows end with their token ``t``.
        sharded: the policy is FSDP2-sharded over initialised process groups.
        step_masks: hand the decoding steps the rows' padding mask as sdpa reads it (:func:`sdpa_step_masks_exact`)
            while some row has padding (without, transformers passes sdpa no mask).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        prompts: PromptBatch,
        steps: int,
        sampler: TokenSampler,
        uniforms: torch.Tensor | None,
        completions: Completions,
        ends: StepEndTest,
        sharded: bool,
        step_masks: bool = False,
    ) -> None:
        self.policy, self.prompts, self.steps, self.sampler = policy, prompts, steps, sampler
        self.completions, self.ends, self.sharded = completions, ends, sharded
        self.rows = torch.arange(prompts.input_ids.shape[0], device=prompts.input_ids.device)  # [r]
        self.row_mask, self.row_uniforms = prompts.attention_mask, uniforms  # [r, P + T], [r, T]
        self.cache = buffered_cache(policy.config, prompts.width + steps)
        self.padding = prompts.attention_mask.bool() if step_masks else None  # [r, P + T]
        self.step_masks = step_masks and self._padded()

    def run(self, with_embeddings: bool) -> Generation:
        """Sample every row to its end; the completions (with their mean final hidden states when asked)."""
        step_ids, positions = self.prompts.input_ids, self.prompts.positions  # [r, P]
        pooled: torch.Tensor | None = None  # [n, H], the completion tokens' hidden states summed
        captured: list[torch.Tensor] = []
        record = self.completions.record
        with last_hidden_states(self.policy, with_embeddings, captured):
            for t in range(self.steps + 1):
                logits = self._prefill() if t == 0 else self._forward(step_ids, positions, t)  # [r, V]
                if with_embeddings and t > 0:  # the hidden state of token t - 1, where it is in the completion
                    pooled = self._pool(pooled, captured.pop(), t)
                captured.clear()
                if t == self.steps:
                    break
                uniforms = None if self.row_uniforms is None else self.row_uniforms[:, t]  # [r]
                token, log_probs = self.sampler(logits, uniforms, t)
                done, newly, token = record(self.rows, t, token, log_probs, self._ends_at(t))
                if t == self.steps - 1 and not with_embeddings:
                    break  # the last token: nothing left to sample or to feed
                # who needs the next forward: the rows still sampling, and (embeddings) those whose token t is new
                keep = self._needed(~done if with_embeddings else ~(done | newly))  # [r]
                if keep is None:
                    break
                step_ids, positions = self._leave(keep, token.unsqueeze(-1), positions[:, -1:] + 1)  # [r, 1]
        lengths = self.completions.lengths
        embeddings = None if pooled is None else pooled / lengths.clamp(min=1).unsqueeze(-1).to(pooled.dtype)
        return self.completions.generation(embeddings)

    def _ends_at(self, t: int) -> EndTest:
        """Which rows of the batch end with their token ``t`` (``ends`` on the current ``rows``)."""
        return lambda token, done: self.ends(token, done, self.rows, t)

    def _padded(self) -> bool:
        """Whether a row in the batch has padding (its prompt is shorter than the widest)."""
        return self.padding is not None and not bool(self.padding[:, : self.prompts.width].all())

    def _forward(self, step_ids: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        """The logits ``[r, V]`` of the last column after feeding ``step_ids``."""
        columns = self.prompts.width + t
        mask = self.row_mask[:, :columns]  # [r, P + t]
        if self.step_masks and t > 0:  # [r, 1, 1, P + t]: what transformers builds for sdpa and one query column
            mask = self.padding[:, None, None, :columns]
        return self.policy(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def _prefill(self) -> torch.Tensor:
        """Step 0's logits ``[n, V]``: the G rows of a prompt (consecutive, equal) share its pass, so each distinct
        prompt is fed once and its cache rows and logits are copied to its rows (``lit_gcpo.training.shared_prompts``:
        the same numbers as from G passes, within float rounding)."""
        ids, positions, width = self.prompts.input_ids, self.prompts.positions, self.prompts.width
        runs = prompt_runs(ids, self.row_mask[:, :width], width) if gathers_rows(self.cache) else None
        if runs is None:
            return self._forward(ids, positions, 0)
        first, rows = runs  # [u], [n]
        logits = self.policy(
            input_ids=ids[first],
            attention_mask=self.row_mask[first, :width],
            position_ids=positions[first],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # [u, V]
        gather_rows(self.cache, rows)
        return logits[rows]

    def _pool(self, pooled: torch.Tensor | None, hidden: torch.Tensor, t: int) -> torch.Tensor:
        """``pooled`` plus the hidden states ``[r, H]`` of token ``t - 1`` of the rows whose completion has it."""
        hidden = hidden.float() * (t - 1 < self.completions.lengths[self.rows]).unsqueeze(-1)  # [r, H]
        if pooled is None:
            pooled = hidden.new_zeros(self.completions.lengths.shape[0], hidden.shape[1])  # [n, H]
        return pooled.index_add_(0, self.rows, hidden)

    def _needed(self, keep: torch.Tensor) -> torch.Tensor | None:
        """The rows that need the next forward pass (every row when sharded), or None when none does (on any
        rank when sharded: each forward pass of a sharded policy gathers weights from all ranks)."""
        flag = keep.any().to(torch.int32)
        if self.sharded:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            keep = torch.ones_like(keep)
        return keep if bool(flag) else None

    def _leave(
        self, keep: torch.Tensor, step_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the rows not in ``keep`` from the batch and the cache once they are ``COMPACT_SHARE`` of it; the
        next step's ``step_ids`` and ``positions`` of the rows that stay."""
        leaving = keep.numel() - int(keep.sum())
        if leaving == 0 or leaving < COMPACT_SHARE * keep.numel():
            return step_ids, positions
        kept = keep.nonzero().squeeze(-1)  # [r'] positions in the cache
        self.cache.batch_select_indices(kept)
        self.rows, self.row_mask = self.rows[kept], self.row_mask[kept]
        if self.padding is not None:
            self.padding = self.padding[kept]
            self.step_masks = self.step_masks and self._padded()
        if self.row_uniforms is not None:
            self.row_uniforms = self.row_uniforms[kept]
        return step_ids[kept], positions[kept]
