"""Log-probs (and entropies, hidden states) of completion tokens, through the model's own forward pass.

Every pass goes through ``model(...)``, so wrappers that act in ``forward`` see it: FSDP2 gathers the
sharded weights in its forward hooks, DDP prepares its gradient reduction, peft routes through the
adapters. Inside that forward the decoder's final hidden state is captured by a hook and turned into
the sampled tokens' log-probs by :func:`lit_gcpo.algorithms.logprobs.token_logprobs` without full ``[n, L, V]``
logits (``logits_to_keep=1`` keeps the model's own head to a single column). The capture and the chunked
computation run in a forward hook of the model itself, before FSDP's post-forward hook may free the
gathered weights; the results travel on the model's output, where FSDP registers its backward hooks.

The chunked path equals the model's logits only when its ``forward`` is ``lm_head(decoder(x))``. Models
that transform the logits there (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``) would be silently wrong, so :func:`has_plain_head` compares the two on a few tokens
once, and such models use their own logits (``logits_to_keep``: the predicting positions), log-softmaxed chunk
by chunk.

Padding-free passes (``padding_free``): the micro-batch's real tokens run as one row, position ids restarting per
sequence and no attention mask, with flash-attention's boundary kwargs (``cu_seq_lens_q`` ...), transformers'
own padding-free inputs (what ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives it). Flash-attention
runs its variable-length kernel on the boundaries; sdpa, eager and flex attention (transformers 5.x,
``masking_utils.find_packed_sequence_indices``) build a block-diagonal causal mask from the restarting position ids
when no mask and no cache is given. Scores are gathered back into the padded ``[n, L]`` layout
(``lit_gcpo.algorithms.packing``).

Shared prompt passes (``lit_gcpo.training.shared_prompts``, on by default): the consecutive rows of a pass that
repeat a prompt (a group's G completions) run it once, with a KV cache, and their completions on that cache; the
same scores and gradients within float rounding, less work (the prompts' columns once per group, not G times).

``with_distribution`` adds, in the same forward, the summaries of the whole next-token distribution at each
completion position (entropy, mean log-prob over the vocabulary: ``lit_gcpo.algorithms.token_distribution``),
made from the same hidden states (or the model's own logits) chunk by chunk, without gradient (one more head
matmul per chunk), for the token-distribution rewards and the high-entropy token mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_gcpo.algorithms.logprobs import PLAIN_LOGITS_ELEMENTS, logprobs_from_logits, token_logprobs
from lit_gcpo.algorithms.packing import pack, pack_layout, unpack_completions
from lit_gcpo.algorithms.token_distribution import (
    TokenDistributionStats,
    hidden_distribution_stats,
    logits_distribution_stats,
)
from lit_gcpo.training.shared_prompts import full_attention_cache, prompt_runs, shared_prompt_problem


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


@torch.no_grad()
def has_plain_head(model: torch.nn.Module, num_tokens: int = 8) -> bool:
    """Whether ``model(x).logits`` equals ``lm_head(decoder(x))`` on a few tokens (no logit transform)."""
    base = base_model(model)
    device = next(base.parameters()).device
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(num_tokens, device=device) * 7 % vocab).unsqueeze(0)  # [1, t]
    was_training = base.training
    base.eval()
    try:
        logits = base(input_ids=ids, use_cache=False).logits.float()  # [1, t, V]
        hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        manual = base.get_output_embeddings()(hidden).float()  # [1, t, V]
    finally:
        base.train(was_training)
    return bool(torch.allclose(manual, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max().clamp(min=1))))


@dataclass
class ScoredTokens:
    """What one scoring pass returns for ``n`` sequences with ``L`` completion columns.

    Attributes:
        logprobs: the sampled tokens' log-probs under ``log_softmax(logits / T)``, ``[n, L]`` float32.
        entropy: the entropy of that distribution at each completion position, ``[n, L]``, or None.
        hidden: the final hidden state at each completion position, ``[n, L, H]``, or None.
        distribution: summaries of that distribution at each completion position (``lse``, ``entropy``,
            ``mean_logprob``, each ``[n, L]``, no gradient), or None.
        vocab_size: V, the entries of that distribution (with ``distribution``).
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    hidden: Tensor | None = None
    distribution: TokenDistributionStats | None = None
    vocab_size: int | None = None


class CompletionScorer:
    """Scores completions with ``model``'s forward (see the module docstring).

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        chunk_size: tokens per chunk of the memory-bounded log-softmax.
        plain_head: whether the chunked path is exact for this model; None checks it (:func:`has_plain_head`).
        padding_free: run each pass over the real tokens only, packed into one row (``lit_gcpo.algorithms.packing``);
            checked once here on two short sequences (:func:`packing_problem`), a ValueError if the model's
            attention does not keep packed sequences apart.
        max_plain_elements: the largest ``tokens x vocabulary`` that ``token_logprobs`` computes in one piece.
        share_prompts: run the distinct prompts of a pass once each, their completions on a KV cache
            (``lit_gcpo.training.shared_prompts``), when the model passes :func:`shared_prompt_problem` (checked once
            here; ``prompt_sharing_problem`` says why not) and the pass is not padding-free.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: int,
        plain_head: bool | None = None,
        padding_free: bool = False,
        max_plain_elements: int = PLAIN_LOGITS_ELEMENTS,
        share_prompts: bool = True,
    ) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.plain_head = has_plain_head(model) if plain_head is None else plain_head
        self.max_plain_elements = max_plain_elements
        self.padding_free = padding_free
        if padding_free:
            problem = packing_problem(self)
            if problem is not None:
                raise ValueError(problem)
        self.prompt_sharing_problem: str | None = "not asked for" if not share_prompts else None
        if share_prompts:
            self.prompt_sharing_problem = "padding-free passes" if padding_free else shared_prompt_problem(self)
        self.shares_prompts = self.prompt_sharing_problem is None

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_length: int,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_hidden: bool = False,
        with_distribution: bool = False,
    ) -> ScoredTokens:
        """Score the last ``completion_length`` columns of ``input_ids [n, P + L]`` under ``log_softmax(logits /
        temperature)`` (the sampling distribution: ``lit_gcpo.engines.base.logprob_temperature``)."""
        options = {
            "temperature": temperature,
            "with_entropy": with_entropy,
            "with_hidden": with_hidden,
            "with_distribution": with_distribution,
        }
        if self.padding_free:
            return self._packed(input_ids, attention_mask, completion_length, **options)
        runs = None
        if self.shares_prompts and self._cache_usable():
            runs = prompt_runs(input_ids, attention_mask, input_ids.shape[1] - completion_length)
        if runs is not None:
            return self._shared(input_ids, attention_mask, completion_length, runs, **options)
        return self._plain(input_ids, attention_mask, completion_length, **options)

    def _plain(self, input_ids: Tensor, attention_mask: Tensor, completion_length: int, **options: Any) -> ScoredTokens:
        """One pass over the padded rows ``[n, P + L]``."""
        prompt_length = input_ids.shape[1] - completion_length
        # the token at column P + j is predicted from the hidden state at column P + j - 1
        predictors = torch.arange(prompt_length - 1, input_ids.shape[1] - 1, device=input_ids.device)  # [L]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),  # [n, P + L], as generation computes them
        }
        return self._score(inputs, predictors, input_ids[:, prompt_length:], **options)

    def _cache_usable(self) -> bool:
        """Whether this call may run the prompts with a KV cache (``lit_gcpo.training.shared_prompts``)."""
        return not base_model(self.model).is_gradient_checkpointing

    def _shared(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_length: int,
        runs: tuple[Tensor, Tensor],
        **options: Any,
    ) -> ScoredTokens:
        """The distinct prompts ``runs[0]`` once each with a KV cache, gathered to the rows (``runs[1]``), then the
        completion columns on it (``lit_gcpo.training.shared_prompts``)."""
        first, rows = runs  # [u], [n]
        prompt_length = input_ids.shape[1] - completion_length
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, P + L]
        base = base_model(self.model)
        cache = full_attention_cache(base.config)
        captured: dict[str, Tensor] = {}

        def keep_last(_module: Any, _args: Any, output: Any) -> None:
            captured["last"] = output.last_hidden_state[:, -1:]  # [u, 1, H]: predicts each completion's first token

        hook = base.get_decoder().register_forward_hook(keep_last)
        try:
            prompt = slice(0, prompt_length)
            self.model(
                input_ids=input_ids[first, prompt],
                attention_mask=attention_mask[first, prompt],
                position_ids=positions[first, prompt],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            hook.remove()
        cache.batch_select_indices(rows)  # [u] -> [n] rows; backward adds the copies' gradients
        inputs = {
            "input_ids": input_ids[:, prompt_length:],  # [n, L]
            "attention_mask": attention_mask,  # [n, P + L]: the cache's columns and these
            "position_ids": positions[:, prompt_length:],
            "past_key_values": cache,
        }
        predictors = torch.arange(completion_length, device=input_ids.device)  # in [prompt's last, completion...]
        return self._score(inputs, predictors, input_ids[:, prompt_length:], before=captured["last"][rows], **options)

    def _packed(
        self, input_ids: Tensor, attention_mask: Tensor, completion_length: int, **options: Any
    ) -> ScoredTokens:
        """The padding-free pass: the micro-batch's real tokens in one row ``[1, S]``, scored, scattered back."""
        layout = pack_layout(attention_mask, completion_length)
        ids = pack(input_ids, layout).unsqueeze(0)  # [1, S]
        inputs = {
            "input_ids": ids,
            # no attention mask: transformers' sdpa / eager / flex masks then keep attention within the blocks of
            # restarting position ids, and flash-attention runs its varlen kernel on the boundaries given here
            "position_ids": layout.position_ids.unsqueeze(0),  # [1, S]
            "cu_seq_lens_q": layout.cu_seqlens,
            "cu_seq_lens_k": layout.cu_seqlens,
            "max_length_q": layout.max_seqlen,
            "max_length_k": layout.max_seqlen,
        }
        scored = self._score(inputs, layout.predictors, ids[:, layout.predictors + 1], **options)  # [1, M, ...]
        distribution = None
        if scored.distribution is not None:  # [1, M] each -> [n, L]
            distribution = TokenDistributionStats(*(unpack_completions(v[0], layout) for v in scored.distribution))
        return ScoredTokens(
            logprobs=unpack_completions(scored.logprobs[0], layout),  # [n, L]
            entropy=None if scored.entropy is None else unpack_completions(scored.entropy[0], layout),
            hidden=None if scored.hidden is None else unpack_completions(scored.hidden[0], layout),  # [n, L, H]
            distribution=distribution,
            vocab_size=scored.vocab_size,
        )

    def _score(
        self,
        inputs: dict[str, Any],
        predictors: Tensor,
        targets: Tensor,
        *,
        temperature: float,
        with_entropy: bool,
        with_hidden: bool,
        with_distribution: bool = False,
        before: Tensor | None = None,
    ) -> ScoredTokens:
        """One forward ``model(**inputs)``; the log-probs of ``targets [b, t]`` from the hidden states (or the
        model's own logits) at sequence positions ``predictors [t]``, the token's own hidden state one further.
        ``before`` ``[b, 1, H]``: the hidden state of the column before the first input column (a cached prompt's
        last), position 0 of the positions ``predictors`` counts in then."""
        base = base_model(self.model)
        captured: dict[str, Tensor] = {}

        def keep_hidden(_module: Any, _args: Any, output: Any) -> None:
            captured["hidden"] = output.last_hidden_state  # [b, T, H], after the final norm

        def score(_module: Any, _args: Any, _kwargs: Any, output: Any) -> Any:
            hidden = captured.pop("hidden")
            if before is not None:
                hidden = torch.cat([before.to(hidden.dtype), hidden], 1)  # [b, 1 + T, H]
            if self.plain_head:
                head = base.get_output_embeddings()
                logprobs, entropy = token_logprobs(
                    hidden[:, predictors],  # [b, t, H]
                    head.weight,
                    targets,
                    temperature=temperature,
                    chunk_size=self.chunk_size,
                    with_entropy=with_entropy,
                    lm_head_bias=head.bias,
                    max_plain_elements=self.max_plain_elements,
                )
            else:  # the model's own logits at the predicting positions (logits_to_keep below)
                logprobs, entropy = logprobs_from_logits(
                    output.logits, targets, temperature, self.chunk_size, with_entropy
                )
            output["completion_logprobs"] = logprobs
            if with_distribution:  # inside the forward: FSDP2 has gathered the head's weight
                output["completion_distribution"] = self._distribution(base, hidden[:, predictors], output, temperature)
                vocab = base.get_output_embeddings().weight.shape[0] if self.plain_head else output.logits.shape[-1]
                output["vocab_size"] = int(vocab)
            if entropy is not None:
                output["completion_entropy"] = entropy
            if with_hidden:
                output["completion_hidden"] = hidden[:, predictors + 1]
            return output

        hooks = [
            base.get_decoder().register_forward_hook(keep_hidden),
            base.register_forward_hook(score, with_kwargs=True, prepend=True),
        ]
        try:
            use_cache = "past_key_values" in inputs
            output = self.model(**inputs, use_cache=use_cache, logits_to_keep=1 if self.plain_head else predictors)
        finally:
            for hook in hooks:
                hook.remove()
        return ScoredTokens(
            logprobs=output["completion_logprobs"],
            entropy=output.get("completion_entropy"),
            hidden=output.get("completion_hidden"),
            distribution=output.get("completion_distribution"),
            vocab_size=output.get("vocab_size"),
        )

    def _distribution(
        self, base: torch.nn.Module, states: Tensor, output: Any, temperature: float
    ) -> TokenDistributionStats:
        """The summaries ``[b, t]`` of the distributions at the predicting positions (hidden ``states [b, t, H]``,
        or the model's own logits there), chunk by chunk."""
        if self.plain_head:
            head = base.get_output_embeddings()
            return hidden_distribution_stats(states, head.weight, temperature, self.chunk_size, head.bias)
        return logits_distribution_stats(output.logits, temperature, self.chunk_size)


@torch.no_grad()
def packing_problem(scorer: CompletionScorer) -> str | None:
    """Why ``scorer``'s model cannot run padding-free passes (None: it can).

    Scores two short sequences (the second with a one-token prompt, left-padded, after a longer first one) padded
    and packed: the model's attention must keep packed sequences apart, which transformers does from the position
    ids (sdpa, eager, flex) or the boundaries (flash-attention); a model whose attention ignores both (linear
    attention or convolutions without the boundary kwargs, custom code) would let the second sequence see the
    first, and its log-probs would move. Tolerance: 1e-4 in float32 / float64 weights, 5e-2 in 16-bit ones.
    """
    base = base_model(scorer.model)
    first = next(base.parameters())
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(2 * 11, device=first.device) * 7 + 3).remainder(vocab).view(2, 11)  # [2, P + L], P = 4
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # the second prompt: one token, left-padded
    attention_mask[1, 6:] = 0  # the second completion: two tokens, right-padded
    was_training = base.training
    base.eval()
    try:
        plain = CompletionScorer(scorer.model, scorer.chunk_size, scorer.plain_head, share_prompts=False)
        padded = plain(ids, attention_mask, 7)
        packed = scorer._packed(ids, attention_mask, 7, temperature=1.0, with_entropy=False, with_hidden=False)
    finally:
        base.train(was_training)
    scored = attention_mask[:, 4:].bool()  # [2, L]
    gap = float((padded.logprobs - packed.logprobs)[scored].abs().max())
    tolerance = 1e-4 if first.dtype in (torch.float32, torch.float64) else 5e-2
    if not gap <= tolerance:  # NaN fails too
        implementation = getattr(base.config, "_attn_implementation", None)
        return (
            f"model.padding_free: {type(base).__name__} with attn_implementation {implementation!r} does not keep "
            f"packed sequences apart (log-probs of a sequence move by {gap:.3g} when another precedes it in the "
            "row); set padding_free false"
        )
    return None
