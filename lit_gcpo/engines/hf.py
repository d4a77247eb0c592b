"""The ``hf`` rollout engine: a sampling loop over the live policy's forward with its KV cache.

It generates with the very module the trainer updates, so ``sync_weights`` has nothing to do. Why a loop
of its own rather than ``model.generate``:

- **Per-prompt seeds.** Completion ``j`` of a prompt with seed ``s`` draws its uniforms from a SplitMix64
  stream keyed by ``(s, j)`` (one uniform per sampled token, all rows' streams computed at once as tensor
  arithmetic), and a token is sampled by inverting the CDF of its distribution. A prompt's completions
  therefore depend on its seed and the weights only, not on the other prompts of the batch, the batch size
  or the number of data-parallel ranks; ``generate`` shares one RNG stream.
- **No full logits.** Each step keeps the sampled token's log-probability ``log_softmax(logits / T)``
  (before top-k/top-p, as :class:`Generation` documents) and drops the step's ``[n, V]`` logits; asking
  ``generate`` for log-probs stacks ``[n, T, V]`` (tens of GB at Qwen's vocabulary and 3000 tokens).
- **Every end-of-sequence id**: the tokenizer's and the generation config's (chat models list several).
- **Sharded policies** (FSDP2): every forward pass gathers weights from all ranks, so a rank whose
  sequences all ended keeps stepping until every rank's have.

The G rows of a prompt share its prefill: each distinct prompt is fed once and its cache rows and logits are copied
to its rows (``SamplingLoop._prefill``), the same numbers as G prefills within float rounding. While a row has
padding, an sdpa policy's decoding steps are handed the mask sdpa reads for one query column (the rows' padding
mask) rather than transformers rebuilding it at every step: bit-equal logits, checked once per policy
(``decoding.sdpa_step_masks_exact``). Top-k and top-p use
transformers' logits warpers; the KV cache is transformers' ``DynamicCache`` with its layers
writing into buffers that grow by doubling (``lit_gcpo.engines.kv_cache``). Stop strings are matched
in the decoded text, as vLLM does: each row keeps the last characters of its completion's text, extended by
the new token's text (every vocabulary entry decoded once). transformers' ``StopStringCriteria`` was not used
because it cannot read a vocabulary without letters (it decodes each token after a letter prefix), such as
the embedded tiny policy's character tokenizer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import torch
from torch.distributed.fsdp import FSDPModule

from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig, end_of_sequence_ids, prompt_seeds
from lit_gcpo.engines.decoding import Completions, SamplingLoop, TokenSampler, left_padded, sdpa_step_masks_exact
from lit_gcpo.training.scoring import base_model

log = logging.getLogger(__name__)


def _to_int64(value: int) -> int:
    """The two's-complement int64 with the bits of the 64-bit unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_int64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MIX1, _MIX2 = _to_int64(0xBF58476D1CE4E5B9), _to_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def seeded_uniforms(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """``[n, steps]`` float64 uniforms in [0, 1): row ``r`` is the first ``steps`` draws of the SplitMix64
    generator whose state starts at ``mix(keys[r])``, each draw's top 53 bits over 2^53. All rows at once,
    with no generator object per row (which cost a few ms per call at 256 rows)."""
    state = _mix64(keys.to(torch.int64)).unsqueeze(-1)  # [n, 1]
    counters = torch.arange(1, steps + 1, dtype=torch.int64) * _GOLDEN  # [T], wrapping
    bits = _mix64(state + counters)  # [n, T]
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53


class StopStrings:
    """Ends a row when its completion's decoded text contains one of ``stops``.

    Each row keeps the last ``max(len(stop)) - 1`` characters of its text: a stop string not seen before the new
    token must end inside the new token's text, so it lies within that tail plus the new text.

    Args:
        token_texts: the decoded text of each token id.
        stops: the stop strings (non-empty).
        rows: the number of rows.
    """

    def __init__(self, token_texts: list[str], stops: list[str], rows: int) -> None:
        if any(not stop for stop in stops):
            raise ValueError("sampling.stop has an empty string, which would end every completion at once")
        self.token_texts, self.stops = token_texts, stops
        self.keep = max(len(stop) for stop in stops) - 1
        self.tails = [""] * rows

    def __call__(self, tokens: torch.Tensor, finished: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[r]`` bool: which of ``rows`` (not yet ``finished``) complete a stop string with their new ``tokens``."""
        ends = []
        for row, token, done in zip(rows.tolist(), tokens.tolist(), finished.tolist(), strict=True):
            if done:
                ends.append(False)
                continue
            text = self.tails[row] + self.token_texts[token]
            ends.append(any(stop in text for stop in self.stops))
            self.tails[row] = text[len(text) - self.keep :] if self.keep else ""
        return torch.tensor(ends, dtype=torch.bool)


SMALL_POLICY_PARAMETERS = 10_000_000
"""Below this many parameters the CPU sampling loop runs on one thread (see ``HFEngine``'s ``decode_threads``)."""


class HFEngine(RolloutEngine):
    """Generation with the policy's own forward pass.

    Args:
        policy: a transformers causal LM (the trained module itself).
        tokenizer: its tokenizer; ``pad_token_id`` falls back to the first end-of-sequence id.
        max_batch_size: at most this many sequences per forward pass (bounds memory); 0 = all at once.
        decode_threads: torch threads of the sampling loop on a CPU; 0 = one thread for a policy of fewer than
            ``SMALL_POLICY_PARAMETERS``, torch's own setting otherwise. A decode step of a small model is a few
            small matrix products, which threads slow down (measured on 2 cores, 64 rows x 32 tokens: 0.4M
            parameters 0.06 s on one thread vs 0.11 s on two; 3.4M 0.35 vs 0.43 s; 19M 1.42 vs 1.18 s).
            Training keeps torch's setting. ``torch.set_num_threads`` sets the process's count, so only a
            ``generate`` in the main thread changes it (and restores it): one in another thread (``data.off_policy``'s
            worker, which samples while the trainer steps) samples with the count it finds. When the call has no
            effect (vLLM, started in the same process, makes it a no-op) the loop samples with torch's setting and
            a warning names ``data.engine_options.decode_threads``, once.
    """

    samples_from_policy = True
    reports_embeddings = True

    def __init__(self, policy: torch.nn.Module, tokenizer, max_batch_size: int = 0, decode_threads: int = 0) -> None:
        if max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0: automatic), got {decode_threads}")
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.decode_threads = decode_threads
        self.eos_token_ids = end_of_sequence_ids(policy, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self._texts: list[str] | None = None
        self._step_masks: bool | None = None  # sdpa_step_masks_exact, checked at the first generate
        self._threads_settable = True  # until torch.set_num_threads is found to do nothing (vLLM)

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: the engine samples from the live policy."""

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
        with_embeddings: bool = False,
    ) -> Generation:
        """See :meth:`RolloutEngine.generate`; ``with_embeddings`` also returns each completion's mean final
        hidden state, gathered while sampling (one more forward step for the last tokens)."""
        sequences = [ids for ids in prompt_ids for _ in range(num_samples)]  # group-major
        per_prompt = prompt_seeds(sampling, len(prompt_ids), seeds)
        # completion j of prompt i draws from the seed (seed_i, j): independent of the batch it is in
        row_seeds = [None if s is None else (s, j) for s in per_prompt for j in range(num_samples)]
        chunk = self.max_batch_size or len(sequences)
        was_training = self.policy.training
        self.policy.eval()
        out = Generation(completion_ids=[], logprobs=[], truncated=[])
        embeddings = []
        restore = self._set_threads()
        try:
            for start in range(0, len(sequences), chunk):
                rows = slice(start, start + chunk)
                part = self._generate_chunk(sequences[rows], row_seeds[rows], sampling, with_embeddings)
                out.completion_ids += part.completion_ids
                out.logprobs += part.logprobs
                out.truncated += part.truncated
                if part.embeddings is not None:
                    embeddings.append(part.embeddings)
        finally:
            self.policy.train(was_training)
            if restore is not None:
                torch.set_num_threads(restore)
        out.embeddings = torch.cat(embeddings) if embeddings else None
        return out

    def _set_threads(self) -> int | None:
        """Set torch's thread count for the sampling loop (``decode_threads``); the count to restore afterwards, or
        None when it was left alone: outside the main thread, when the loop keeps the current count, and when
        ``torch.set_num_threads`` turns out to do nothing (warned once)."""
        if not self._threads_settable or threading.current_thread() is not threading.main_thread():
            return None
        current = torch.get_num_threads()
        wanted = self._threads(current)
        if wanted == current:
            return None
        torch.set_num_threads(wanted)
        if torch.get_num_threads() == wanted:
            return current
        self._threads_settable = False
        log.warning(
            "data.engine_options.decode_threads: the hf engine's sampling loop samples on torch's %d threads, not %d: "
            "torch.set_num_threads has no effect in this process (vLLM's CPU worker, started in it, replaces it with "
            "a no-op)",
            torch.get_num_threads(),
            wanted,
        )
        return None

    def _threads(self, current: int) -> int:
        """The threads of the sampling loop (see ``decode_threads``)."""
        if next(self.policy.parameters()).device.type != "cpu":
            return current
        if self.decode_threads:
            return self.decode_threads
        small = sum(p.numel() for p in self.policy.parameters()) < SMALL_POLICY_PARAMETERS
        return 1 if small else current

    def _exact_step_masks(self) -> bool:
        """:func:`lit_gcpo.engines.decoding.sdpa_step_masks_exact` of the policy, checked once."""
        if self._step_masks is None:
            self._step_masks = sdpa_step_masks_exact(self.policy)
        return self._step_masks

    def _token_texts(self) -> list[str]:
        """The decoded text of every vocabulary entry (special tokens: empty), computed once."""
        if self._texts is None:
            known = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True)
            # a model's embedding table may be padded beyond the tokenizer (Qwen: 151,936 rows, 151,665 tokens)
            rows = base_model(self.policy).get_output_embeddings().weight.shape[0]
            self._texts = texts + [""] * max(0, rows - known)
        return self._texts

    def _uniforms(self, row_seeds: list[tuple[int, int] | None], steps: int, device: torch.device) -> torch.Tensor:
        """``[n, steps]`` uniforms in [0, 1): row ``r`` from the stream of its (prompt seed, sample); a row without
        a seed from a key drawn from torch's global generator."""
        keys = [
            int(torch.randint(-(2**62), 2**62, ())) if seed is None else seed[0] * 1_000_003 + seed[1]
            for seed in row_seeds
        ]
        return seeded_uniforms(torch.tensor(keys, dtype=torch.int64), steps).to(device)

    def _generate_chunk(
        self,
        sequences: list[list[int]],
        row_seeds: list[tuple[int, int] | None],
        sampling: SamplingConfig,
        with_embeddings: bool = False,
    ) -> Generation:
        device = next(self.policy.parameters()).device
        steps = sampling.max_new_tokens
        prompts = left_padded(sequences, self.pad_token_id, steps, device)
        stop = StopStrings(self._token_texts(), list(sampling.stop), len(sequences)) if sampling.stop else None
        eos = torch.tensor(self.eos_token_ids, device=device)

        def ends(token: torch.Tensor, done: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
            hit = torch.isin(token, eos)  # [r], never before min_tokens (the sampler suppresses it)
            if stop is None:
                return hit
            stopped = stop(token, done, rows).to(hit.device)  # every step: the rows' text tails stay current
            # vLLM's rule: a stop string ends a completion only when its last token is token min_tokens or later
            return hit | stopped if t >= sampling.min_tokens else hit

        sharded = isinstance(self.policy, FSDPModule) and torch.distributed.is_initialized()
        # the one-off check runs forwards: on every rank of a sharded policy at once (collectives), else when needed
        padded = len(set(map(len, sequences))) > 1
        loop = SamplingLoop(
            policy=self.policy,
            prompts=prompts,
            steps=steps,
            sampler=TokenSampler(sampling, eos),
            uniforms=None if sampling.temperature == 0 else self._uniforms(row_seeds, steps, device),  # [n, T]
            completions=Completions(len(sequences), steps, self.pad_token_id, device),
            ends=ends,
            sharded=sharded,
            step_masks=(padded or sharded) and self._exact_step_masks() and padded,
        )
        return loop.run(with_embeddings)
