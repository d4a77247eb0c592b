"""Turning a dataset row into the text the policy sees.

Placeholders are ``{field}`` names of the row; any other braces (``\\boxed{}``) are left as they are, so
templates need no escaping. With a chat model, the filled template is the user message of the tokenizer's
chat template.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_MATH_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."

TEMPLATES = {"qwen-math": QWEN_MATH_TEMPLATE, "plain": "{prompt}"}
"""Templates by name: ``--data.template qwen-math`` is the Qwen2.5-Math boxed-answer prompt."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> list[str]:
    """The row fields a template reads."""
    return _PLACEHOLDER.findall(template)


def fill(template: str, row: dict[str, Any]) -> str:
    """Replace each ``{field}`` with ``row[field]``; a missing field raises ``KeyError`` naming it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in row or row[name] is None:
            raise KeyError(name)
        return str(row[name])

    return _PLACEHOLDER.sub(value, template)


class PromptRenderer:
    """Renders rows with a template, through the tokenizer's chat template when asked to.

    Args:
        template: the user message, with ``{field}`` placeholders, or a name in ``TEMPLATES``.
        system: an optional system message (chat template only).
        chat: ``"auto"`` uses the chat template when the tokenizer has one; ``"always"``/``"never"``.
    """

    def __init__(self, tokenizer: Any, template: str, system: str | None = None, chat: str = "auto") -> None:
        if chat not in ("auto", "always", "never"):
            raise ValueError(f"chat must be 'auto', 'always' or 'never', got {chat!r}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat == "always" and not has_template:
            raise ValueError("chat='always' but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.template = TEMPLATES.get(template, template)
        self.system = system
        self.use_chat = chat == "always" or (chat == "auto" and has_template)

    def render(self, row: dict[str, Any]) -> str:
        text = fill(self.template, row)
        if not self.use_chat:
            return text
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` takes (its config's ``max_position_embeddings``), or None if unknown."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) and length > 0 else None


def fit_prompts(
    prompts: list[str],
    tokenizer: Any,
    budget: int,
    mode: str,
    add_special_tokens: bool = True,
    row_ids: list[int] | None = None,
    label: str = "prompts",
) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Prompts that fit in ``budget`` tokens: ``(kept indices, their prompts, [(index, tokens) too long])``.

    ``mode`` says what happens to a longer prompt: ``error`` raises ``ValueError``; ``skip`` leaves it out;
    ``truncate`` keeps its last ``budget`` tokens (the end holds the question and, with a chat template, the
    assistant turn the completion continues). Both log a warning. Messages start with ``label`` and name the
    count and the first rows (by ``row_ids``, default their positions).
    """
    if mode not in ("error", "skip", "truncate"):
        raise ValueError(f"long_prompts must be 'error', 'skip' or 'truncate', got {mode!r}")
    if budget < 1:
        raise ValueError(f"{label}: no room for a prompt: the completion takes the model's whole context")
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    too_long = [(index, length) for index, length in enumerate(lengths) if length > budget]
    if too_long:
        ids = row_ids if row_ids is not None else list(range(len(prompts)))
        problem = (
            f"{label}: {len(too_long)} of {len(prompts)} prompts are longer than the {budget} tokens the model's "
            "context leaves after the completion (" + ", ".join(f"row {ids[i]}: {n} tokens" for i, n in too_long[:5])
        )
        if mode == "error":
            raise ValueError(f"{problem}); set long_prompts to 'skip' or 'truncate', or lower max_new_tokens")
        action = "skipped" if mode == "skip" else "truncated to their last tokens"
        log.warning("%s); %s (long_prompts: truncate, skip or error)", problem, action)
        if mode == "skip" and len(too_long) == len(prompts):
            raise ValueError(f"{problem}): every prompt is too long")
    long_rows = {index for index, _ in too_long}
    kept = [index for index in range(len(prompts)) if mode == "truncate" or index not in long_rows]
    fitted = [
        _keep_last_tokens(prompts[i], tokenizer, budget, add_special_tokens) if i in long_rows else prompts[i]
        for i in kept
    ]
    return kept, fitted, too_long


def _keep_last_tokens(text: str, tokenizer: Any, budget: int, add_special_tokens: bool) -> str:
    """The longest suffix of ``text`` (cut at a token boundary) that tokenizes to at most ``budget`` tokens."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    special = len(tokenizer("", add_special_tokens=add_special_tokens)["input_ids"])  # e.g. BOS
    start = max(0, len(offsets) - (budget - special))
    while start < len(offsets):
        suffix = text[offsets[start][0] :]
        if len(tokenizer(suffix, add_special_tokens=add_special_tokens)["input_ids"]) <= budget:
            return suffix
        start += 1  # re-tokenising a cut text can merge differently: drop one more token
    return ""
