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
once, and such models use their own logits (``logits_to_keep = L + 1``), log-softmaxed chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_gcpo.algorithms.logprobs import logprobs_from_logits, token_logprobs


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
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    hidden: Tensor | None = None


class CompletionScorer:
    """Scores completions with ``model``'s forward (see the module docstring).

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        chunk_size: tokens per chunk of the memory-bounded log-softmax.
        plain_head: whether the chunked path is exact for this model; None checks it (:func:`has_plain_head`).
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int, plain_head: bool | None = None) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.plain_head = has_plain_head(model) if plain_head is None else plain_head

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_length: int,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_hidden: bool = False,
    ) -> ScoredTokens:
        """Score the last ``completion_length`` columns of ``input_ids [n, P + L]`` under ``log_softmax(logits /
        temperature)`` (the sampling distribution: ``lit_gcpo.engines.base.logprob_temperature``)."""
        base = base_model(self.model)
        prompt_length = input_ids.shape[1] - completion_length
        targets = input_ids[:, prompt_length:]  # [n, L]
        captured: dict[str, Tensor] = {}

        def keep_hidden(_module: Any, _args: Any, output: Any) -> None:
            captured["hidden"] = output.last_hidden_state  # [n, P + L, H], after the final norm

        def score(_module: Any, _args: Any, _kwargs: Any, output: Any) -> Any:
            hidden = captured.pop("hidden")
            if self.plain_head:
                head = base.get_output_embeddings()
                # the token at column P + j is predicted from the hidden state at column P + j - 1
                logprobs, entropy = token_logprobs(
                    hidden[:, prompt_length - 1 : -1],
                    head.weight,
                    targets,
                    temperature=temperature,
                    chunk_size=self.chunk_size,
                    with_entropy=with_entropy,
                    lm_head_bias=head.bias,
                )
            else:  # the model's own logits of columns P - 1 .. P + L - 2
                logprobs, entropy = logprobs_from_logits(
                    output.logits[:, :-1], targets, temperature, self.chunk_size, with_entropy
                )
            output["completion_logprobs"] = logprobs
            if entropy is not None:
                output["completion_entropy"] = entropy
            if with_hidden:
                output["completion_hidden"] = hidden[:, prompt_length:]
            return output

        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, P + L], as generation computes them
        hooks = [
            base.get_decoder().register_forward_hook(keep_hidden),
            base.register_forward_hook(score, with_kwargs=True, prepend=True),
        ]
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1 if self.plain_head else completion_length + 1,
            )
        finally:
            for hook in hooks:
                hook.remove()
        return ScoredTokens(
            logprobs=output["completion_logprobs"],
            entropy=output.get("completion_entropy"),
            hidden=output.get("completion_hidden"),
        )
