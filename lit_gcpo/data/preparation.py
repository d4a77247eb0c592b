"""A split's rows turned into prompts: the rows that have every field the template and the rewards need, rendered,
and fitted into the model's context (``RolloutDataModule.setup``, once per split).

A row that lacks a needed field is skipped and counted (a field missing from every row is an error naming it and
the columns there are); a field of the wrong type is an error naming the row. A prompt longer than the context
leaves after the completion is truncated, skipped or an error (``long_prompts``, ``lit_gcpo.data.templates
.fit_prompts``); a truncated row carries ``over_context: True`` and the skipped ones are returned for the
evaluation report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lit_gcpo.data.sources import PromptSource, check_field_types
from lit_gcpo.data.templates import PromptRenderer, fit_prompts, placeholders

log = logging.getLogger(__name__)


@dataclass
class CompleteRows:
    """The rows of a split that have every needed field, their prompts, and what was left out."""

    rows: list[dict[str, Any]]
    prompts: list[str]
    row_ids: list[int]  # each kept row's index in the source
    skipped: list[tuple[int, list[str]]]  # (row index, the fields it lacks)


def complete_rows(
    split: str, source: PromptSource, renderer: PromptRenderer, required_fields: list[str], needs_gold: bool = True
) -> CompleteRows:
    """The rows of ``source`` with the template's placeholders and the required fields (``required_fields``
    unless the source names its own; none for ``predict`` or when not ``needs_gold``: label-free training),
    rendered by ``renderer``."""
    rows = source.load()
    if not rows:
        raise ValueError(f"{split}: the prompt source {source.describe()} has no rows")
    required = required_fields if source.required_fields is None else source.required_fields
    required = [] if split == "predict" or not needs_gold else required  # predictions need no gold
    needed = sorted(set(placeholders(renderer.template)) | set(required))
    for name in needed:
        if all(row.get(name) is None for row in rows):
            raise ValueError(
                f"{split}: field {name!r} is missing from every row of {source.describe()}; "
                f"columns are {sorted(rows[0])} (map one with `fields: {{column: {name}}}`)"
            )
    check_field_types(source, rows, placeholders(renderer.template), required)
    selected = CompleteRows([], [], [], [])
    for index, row in enumerate(rows):
        missing = [name for name in needed if row.get(name) is None or row.get(name) == ""]
        if missing:
            selected.skipped.append((index, missing))
            continue
        selected.rows.append(row)
        selected.prompts.append(renderer.render(row))
        selected.row_ids.append(index)
    if selected.skipped:
        shown = ", ".join(f"row {i} lacks {m}" for i, m in selected.skipped[:5])
        log.warning(
            "%s: skipped %d of %d rows of %s (%s)", split, len(selected.skipped), len(rows), source.describe(), shown
        )
    return selected


def fit_to_context(
    selected: CompleteRows, renderer: PromptRenderer, budget: int, long_prompts: str, label: str
) -> tuple[list[dict[str, Any]], list[str], list[tuple[int, dict[str, Any]]], int]:
    """``(rows, prompts, dropped, too long)``: the prompts fitted into ``budget`` tokens by ``long_prompts``
    (``truncate``, ``skip``, ``error``); truncated rows marked ``over_context``; ``dropped`` the skipped ones as
    ``(row index in the source, row)``; ``too long`` how many were over the budget (truncated or skipped)."""
    kept, prompts, too_long = fit_prompts(
        selected.prompts,
        renderer.tokenizer,
        budget,
        long_prompts,
        not renderer.use_chat,
        selected.row_ids,
        label=label,
    )
    rows = selected.rows
    long_rows, kept_set = {index for index, _ in too_long}, set(kept)
    dropped = [(selected.row_ids[i], rows[i]) for i in sorted(long_rows - kept_set)]
    fitted = [{**rows[i], "over_context": True} if i in long_rows else rows[i] for i in kept]
    return fitted, prompts, dropped, len(too_long)
