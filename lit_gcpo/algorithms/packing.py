"""Index math of padding-free (packed) passes: a padded micro-batch as one row of its real tokens, and back.

A rollout micro-batch is ``input_ids [n, P + L]``: prompts left-padded to ``P`` columns, completions right-padded to
``L``. The padded pass runs the model over all ``n (P + L)`` positions, so a batch whose completion lengths vary
tenfold spends most of its matmuls on padding. The packed pass runs it over the real tokens only, sequence after
sequence in one row ``[1, S]`` (``S = sum_i len_i``), with

- position ids restarting at 0 for each sequence (``0 .. len_i - 1``: what ``cumsum(attention_mask) - 1`` gives
  the padded pass, so rotary embeddings see the same positions);
- attention kept within each sequence: the boundaries are ``cu_seqlens [n + 1]`` (flash-attention's variable-length
  kernel reads them; transformers' sdpa / eager / flex masks derive the same blocks from the restarting position
  ids, ``transformers.masking_utils.find_packed_sequence_indices``);
- the completion tokens' log-probs read from the hidden state one packed position earlier (the last prompt token
  predicts the first completion token), then scattered back into the ``[n, L]`` layout the loss expects.

Project's choices: every attended completion column is scored (``attention_mask`` 1), the rest of ``[n, L]`` is 0,
as the loss masks it (``completion_mask`` is a subset of the attended columns); each row's attended tokens must be
contiguous (the rollout layout), and a row with a completion must have a prompt token before it. Pure: tensors in,
tensors out, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Where the real tokens of a padded ``[n, T]`` micro-batch (``T = P + L``) sit in one packed row of ``S``.

    Attributes:
        token_index: flat index into ``[n, T]`` of each packed token, sequence after sequence, ``[S]`` long.
        position_ids: each packed token's position within its own sequence, ``[S]`` long.
        cu_seqlens: sequence boundaries in the packed row, ``[n + 1]`` int32 (flash-attention's ``cu_seqlens``).
        max_seqlen: the longest sequence, a plain int.
        predictors: packed index of the hidden state that predicts each scored completion token (the token before
            it), ``[M]`` long; the token itself is at ``predictors + 1``.
        completion_index: flat index into ``[n, L]`` of each scored completion token, ``[M]`` long.
        shape: ``(n, L)``, the layout the scores go back to.
    """

    token_index: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    predictors: Tensor
    completion_index: Tensor
    shape: tuple[int, int]


def _check_layout(attended: Tensor, completion_length: int) -> None:
    """Contiguous attended tokens per row, and a prompt token before every completion: else a ValueError naming
    the row."""
    if attended.ndim != 2 or not 1 <= completion_length < attended.shape[1]:
        raise ValueError(
            f"attention_mask must be [n, P + L] with P >= 1 prompt columns; got shape {tuple(attended.shape)} and "
            f"completion_length {completion_length}"
        )
    prompt_length = attended.shape[1] - completion_length
    starts = attended & ~torch.nn.functional.pad(attended[:, :-1], (1, 0))  # [n, T] first token of each run
    broken = (starts.sum(-1) > 1).nonzero().flatten()  # [k]
    if broken.numel():
        raise ValueError(
            f"attention_mask row {int(broken[0])}: its tokens are not contiguous, so they cannot be packed"
        )
    orphan = (attended[:, prompt_length:].any(-1) & ~attended[:, prompt_length - 1]).nonzero().flatten()  # [k]
    if orphan.numel():
        raise ValueError(f"attention_mask row {int(orphan[0])}: a completion with no prompt token before it")


def pack_layout(attention_mask: Tensor, completion_length: int) -> PackedLayout:
    """The packed layout of a micro-batch whose last ``completion_length`` columns are completion tokens.

    Args:
        attention_mask: 1 on real tokens, ``[n, P + L]`` (any integer or bool dtype).
        completion_length: ``L``, the number of completion columns.

    Returns:
        A ``PackedLayout`` of ``S`` packed tokens, ``M`` of them scored completion tokens.
    """
    attended = attention_mask.bool()  # [n, T]
    _check_layout(attended, completion_length)
    n, width = attended.shape
    token_index = attended.flatten().nonzero().flatten()  # [S], row-major: sequence after sequence
    position_ids = (attended.cumsum(-1) - 1).flatten()[token_index]  # [S]
    lengths = attended.sum(-1)  # [n]
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # [n + 1]
    packed_of = torch.full((n * width,), -1, dtype=torch.long, device=attended.device)  # [n T]
    packed_of[token_index] = torch.arange(token_index.numel(), device=attended.device)
    scored = attended[:, width - completion_length :]  # [n, L]
    completion_index = scored.flatten().nonzero().flatten()  # [M] into [n, L]
    rows, cols = completion_index // completion_length, completion_index % completion_length
    predictors = packed_of[rows * width + (width - completion_length) + cols] - 1  # [M]
    return PackedLayout(
        token_index=token_index,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()) if n else 0,
        predictors=predictors,
        completion_index=completion_index,
        shape=(n, completion_length),
    )


def pack(values: Tensor, layout: PackedLayout) -> Tensor:
    """The packed row of a padded tensor: ``[n, T, ...]`` -> ``[S, ...]``."""
    return values.flatten(0, 1)[layout.token_index]


def unpack_completions(values: Tensor, layout: PackedLayout) -> Tensor:
    """Scores of the packed completion tokens back in the padded layout: ``[M, ...]`` -> ``[n, L, ...]``, 0 on
    completion columns that were not scored (padding). Differentiable w.r.t. ``values``."""
    n, length = layout.shape
    out = values.new_zeros((n * length, *values.shape[1:]))  # [n L, ...]
    return out.index_copy(0, layout.completion_index, values).view(n, length, *values.shape[1:])
