"""Turning a dataset row into the text the policy sees.

Placeholders are ``{field}`` names of the row; any other braces (``\\boxed{}``) are left as they are, so
templates need no escaping. With a chat model, the filled template is the user message of the tokenizer's
chat template.
"""

from __future__ import annotations

import re
from typing import Any

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
