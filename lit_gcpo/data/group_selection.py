"""Whole groups taken out of ``RolloutBatch``es and put together again: the batch operations dynamic sampling needs.

``select_groups`` keeps some groups of a batch; ``concat_groups`` joins the groups of several batches into one. The
result is packed as ``lit_gcpo.data.rollout.pack_sequences`` packs a batch (prompts left-padded and completions
right-padded to the longest of the batch, not wider), so a batch joined from parts equals the batch the collector
would have built from the same prompts and completions in one call. Every field of ``RolloutBatch`` is classified
below by its shape; a field added to the contract without a class here is an error, not a silently dropped field.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Any

import torch

from lit_gcpo.data.batch import RolloutBatch

GROUP_LISTS = ("prompts", "rows")  # [B]
COMPLETION_LISTS = ("completions", "answers")  # [N]
SEQUENCE_TENSORS = ("input_ids", "attention_mask")  # [N, P + L], prompt left-padded, completion right-padded
TOKEN_TENSORS = (  # [N, L]
    "completion_mask",
    "engine_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "token_entropy",
    "token_mean_logprob",
)
# [N, ...]
COMPLETION_TENSORS = ("rewards", "truncated", "answer_clusters", "embeddings", "advantage_weights", "correct")
# one value per batch (vocab_size: of the distribution token_mean_logprob averages over, set by the scoring pass)
SAMPLING_SETTINGS = ("temperature", "max_new_tokens", "samples_from_policy", "vocab_size")
OWN_FIELDS = ("group_ids", "reward_components", "metrics")  # renumbered, per reward, merged by the caller


def _check_classified() -> None:
    known = {
        *GROUP_LISTS,
        *COMPLETION_LISTS,
        *SEQUENCE_TENSORS,
        *TOKEN_TENSORS,
        *COMPLETION_TENSORS,
        *SAMPLING_SETTINGS,
        *OWN_FIELDS,
    }
    unknown = sorted({f.name for f in fields(RolloutBatch)} - known)
    if unknown:
        raise TypeError(f"lit_gcpo.data.group_selection does not know how to select RolloutBatch fields {unknown}")


def completion_rows(group_ids: torch.Tensor, groups: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``([n] rows, sizes)``: the rows of the completions of ``groups``, group by group in the order given, each
    group's completions in their order in the batch, and each group's size (one host sync in all)."""
    if not groups:
        return torch.zeros(0, dtype=torch.long, device=group_ids.device), []
    counts = torch.bincount(group_ids, minlength=max(groups) + 1)  # [B]
    order = torch.argsort(group_ids, stable=True)  # [N] the rows sorted by group, stable within each
    sizes = counts.tolist()
    starts = [0, *itertools.accumulate(sizes)]
    rows = torch.cat([order[starts[g] : starts[g] + sizes[g]] for g in groups])  # [n]
    return rows, [sizes[g] for g in groups]


def select_groups(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The batch of ``groups`` (indices into ``batch.prompts``) alone, in that order, renumbered ``0..len-1``;
    ``metrics`` stay the batch's. Padding columns no kept completion uses are kept (``concat_groups`` trims)."""
    _check_classified()
    if any(not 0 <= group < batch.num_groups for group in groups):
        raise ValueError(f"select_groups: groups {groups} outside the batch's {batch.num_groups} groups")
    rows, sizes = completion_rows(batch.group_ids, groups)  # [n]
    picked = rows.tolist()
    values: dict[str, Any] = {name: [getattr(batch, name)[g] for g in groups] for name in GROUP_LISTS}
    for name in COMPLETION_LISTS:
        items = getattr(batch, name)
        values[name] = None if items is None else [items[r] for r in picked]
    for name in (*SEQUENCE_TENSORS, *TOKEN_TENSORS, *COMPLETION_TENSORS):
        tensor = getattr(batch, name)
        values[name] = None if tensor is None else tensor[rows]
    values["group_ids"] = torch.arange(len(groups)).repeat_interleave(torch.tensor(sizes, dtype=torch.long))
    values["group_ids"] = values["group_ids"].to(batch.group_ids.device)  # [n]
    values["reward_components"] = {name: value[rows] for name, value in batch.reward_components.items()}
    values.update({name: getattr(batch, name) for name in SAMPLING_SETTINGS}, metrics=dict(batch.metrics))
    return RolloutBatch(**values)


def _fit_columns(tensor: torch.Tensor, width: int, side: str, pad: float) -> torch.Tensor:
    """``tensor`` ``[n, w]`` cut or padded with ``pad`` to ``[n, width]``: on the ``left`` (prompts keep their last
    columns) or the ``right`` (completions keep their first)."""
    have = tensor.shape[1]
    if have >= width:
        return tensor[:, have - width :] if side == "left" else tensor[:, :width]
    filler = tensor.new_full((tensor.shape[0], width - have), pad)
    return torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=1)


def _check_alike(parts: list[RolloutBatch]) -> None:
    if not parts:
        raise ValueError("concat_groups needs at least one group")
    for name in SAMPLING_SETTINGS:
        settings = {getattr(part, name) for part in parts}
        if len(settings) > 1:
            raise ValueError(f"concat_groups: the parts were sampled with different {name}: {sorted(settings)}")
    for name in (*COMPLETION_LISTS, *TOKEN_TENSORS, *COMPLETION_TENSORS):
        if len({getattr(part, name) is None for part in parts}) > 1:
            raise ValueError(f"concat_groups: some parts have {name} and others not")
    if len({tuple(sorted(part.reward_components)) for part in parts}) > 1:
        raise ValueError("concat_groups: the parts have different reward components")


def batch_to(batch: RolloutBatch, device: torch.device | str) -> RolloutBatch:
    """A copy of ``batch`` with every tensor on ``device`` (lists and settings shared)."""
    values = {f.name: getattr(batch, f.name) for f in fields(RolloutBatch)}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            values[name] = value.to(device)
    values["reward_components"] = {name: value.to(device) for name, value in batch.reward_components.items()}
    values["metrics"] = dict(batch.metrics)
    return RolloutBatch(**values)


def concat_groups(parts: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """The groups of ``parts`` one after the other in one batch, packed to the longest prompt and completion they
    hold (``pad_token_id`` fills ``input_ids``); ``metrics`` empty (the caller merges the parts'). The parts must
    have been sampled alike (temperature, ``max_new_tokens``, engine) and carry the same optional fields."""
    _check_classified()
    parts = [part for part in parts if part.num_groups > 0]
    _check_alike(parts)
    first = parts[0]
    prompt_width = max(int(part.attention_mask[:, : part.prompt_length].sum(-1).max()) for part in parts)
    completion_width = max(1, max(int(part.completion_mask.sum(-1).max()) for part in parts))
    values: dict[str, Any] = {name: [item for part in parts for item in getattr(part, name)] for name in GROUP_LISTS}
    for name in COMPLETION_LISTS:
        values[name] = None if getattr(first, name) is None else [x for part in parts for x in getattr(part, name)]
    for name in SEQUENCE_TENSORS:
        pad = pad_token_id if name == "input_ids" else 0
        values[name] = torch.cat(
            [
                torch.cat(
                    [
                        _fit_columns(getattr(part, name)[:, : part.prompt_length], prompt_width, "left", pad),
                        _fit_columns(getattr(part, name)[:, part.prompt_length :], completion_width, "right", pad),
                    ],
                    dim=1,
                )
                for part in parts
            ]
        )  # [N, P + L]
    for name in TOKEN_TENSORS:
        if getattr(first, name) is not None:
            values[name] = torch.cat([_fit_columns(getattr(p, name), completion_width, "right", 0) for p in parts])
    for name in COMPLETION_TENSORS:
        if getattr(first, name) is not None:
            values[name] = torch.cat([getattr(part, name) for part in parts])
    offsets = torch.tensor([0, *(part.num_groups for part in parts[:-1])]).cumsum(0).tolist()
    values["group_ids"] = torch.cat([part.group_ids + offset for part, offset in zip(parts, offsets, strict=True)])
    values["reward_components"] = {
        name: torch.cat([part.reward_components[name] for part in parts]) for name in first.reward_components
    }
    values.update({name: getattr(first, name) for name in SAMPLING_SETTINGS}, metrics={})
    return RolloutBatch(**values)
