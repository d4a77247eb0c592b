"""One forward pass per prompt, not per completion: the G completions of a group share their prompt's pass.

A GRPO batch holds each prompt G times (group-major, every copy left-padded alike), and a log-prob pass over the
``[N, P + L]`` rows computes each prompt's keys, values and hidden states G times over, in the forward and in the
backward. The prompt's columns of a row do not depend on its completion (causal attention), so the scorer
(``lit_gcpo.training.scoring.CompletionScorer``) runs the distinct prompts of a micro-batch once each, ``[u, P]``
with a KV cache, gathers the cache's rows to the ``N`` sequences (an index: in the backward the gradients of a
prompt's copies add up, as they would over the G separate copies), and runs the completions ``[N, L]`` on it; the
log-prob of a completion's first token comes from its prompt's last hidden state. The same numbers within float
rounding (the matmuls see other shapes; 1e-6 in float32 on the tiny Llama of ``benchmarks/vs_trl_work.py``, and
its gradients likewise). The shared-prefix forward of Prefix Grouper (Liu et al. 2025, arXiv 2506.05433), here
through the model's own KV cache rather than a custom attention.

Rows share a prompt when they are consecutive and their prompt columns are equal (ids and mask): found in the data,
so a micro-batch that cuts a group, or a batch without groups, is handled alike (no sharing: the plain pass). Not
used (the plain pass instead) with gradient checkpointing (transformers drops the cache in a checkpointed layer while
training) and for a model that fails :func:`shared_prompt_problem` once (a cache whose layers are not all full
attention, an attention that ignores or refuses the cache). FSDP2 runs the two forwards before one backward: its
2-rank runs equal DDP's and one process's (``tests/test_ddp.py``, bf16-mixed with a reference too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def prompt_runs(input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> tuple[Tensor, Tensor] | None:
    """The distinct prompts of consecutive rows: ``(first [u], rows [n])``, the first row of each run of equal prompt
    columns and each row's run; None when no two consecutive rows share their prompt (nothing to save)."""
    ids, mask = input_ids[:, :prompt_length], attention_mask[:, :prompt_length]  # [n, P]
    same = ((ids[1:] == ids[:-1]) & (mask[1:] == mask[:-1])).all(-1)  # [n - 1]: row r + 1 repeats row r's prompt
    starts = torch.cat([same.new_ones(1), ~same])  # [n]
    rows = starts.cumsum(0) - 1  # [n], the run of each row
    first = starts.nonzero().squeeze(-1)  # [u]
    if first.numel() == input_ids.shape[0]:
        return None
    return first, rows


def full_attention_cache(config: Any) -> DynamicCache | None:
    """An empty ``DynamicCache`` for ``config`` whose layers are plain full-attention ``DynamicLayer`` s (as many as
    the config declares, or added as the model writes them), else None (sliding windows and other layer kinds: the
    prompt pass is not shared)."""
    cache = DynamicCache(config=config)
    return cache if all(type(layer) is DynamicLayer for layer in cache.layers) else None


@torch.no_grad()
def shared_prompt_problem(scorer: Any) -> str | None:
    """Why ``scorer``'s model cannot share prompt passes (None: it can).

    Scores four sequences, two prompts twice each (the second one token shorter, left-padded; completions of several
    lengths, right-padded), with the shared pass and without: the log-probs must agree within 1e-4 in float32 /
    float64 weights, 5e-2 in 16-bit ones, and the shared pass must run (an attention implementation that cannot
    read a cache raises).
    """
    from lit_gcpo.training.scoring import base_model  # the scorer's module imports this one

    base = base_model(scorer.model)
    if not scorer.plain_head:
        return "the model transforms its logits (its own logits are scored, from one pass)"
    if full_attention_cache(base.config) is None:
        return "its KV cache has layers other than full attention"
    first = next(base.parameters())
    vocab = base.get_output_embeddings().weight.shape[0]
    prompts = (torch.arange(2 * 5, device=first.device) * 5 + 2).remainder(vocab).view(2, 5)  # [2, P]
    completions = (torch.arange(4 * 6, device=first.device) * 7 + 3).remainder(vocab).view(4, 6)  # [4, L]
    input_ids = torch.cat([prompts.repeat_interleave(2, 0), completions], 1)  # [4, P + L]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 0] = 0  # the second prompt: four tokens, left-padded
    attention_mask[1, 8:] = attention_mask[3, 6:] = 0  # completions of 3, 6, 6 and 1 tokens
    was_training = base.training
    base.eval()
    try:
        options = {"temperature": 1.0, "with_entropy": False, "with_hidden": False}
        shared = scorer._shared(input_ids, attention_mask, 6, prompt_runs(input_ids, attention_mask, 5), **options)
        plain = scorer._plain(input_ids, attention_mask, 6, **options)
    except Exception as error:  # an attention that cannot read a cache (a custom kernel): the plain pass
        return f"the shared prompt pass failed: {type(error).__name__}: {error}"
    finally:
        base.train(was_training)
    scored = attention_mask[:, 5:].bool()  # [4, L]
    gap = float((shared.logprobs - plain.logprobs)[scored].abs().max())
    tolerance = 1e-4 if first.dtype in (torch.float32, torch.float64) else 5e-2
    return None if gap <= tolerance else f"the shared prompt pass moves the log-probs by {gap:.3g}"
