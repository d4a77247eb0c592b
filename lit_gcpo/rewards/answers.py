"""Final answers of math completions and benchmark golds: extraction, normalisation, equivalence.

* ``extract_boxed`` returns the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces
  balance, in one linear pass (no regex backtracking, no recursion: 10,000 nested braces or a
  megabyte of text cost a few milliseconds).
* ``gold_answer`` turns the gold fields of the usual benchmarks into one answer string (see its
  docstring for the formats).
* ``answers_equivalent`` decides equivalence with Math-Verify (``parse`` + ``verify``) in a separate,
  killable process (``lit_gcpo.rewards.sandbox``) so the time bound holds in any thread and against
  C-level hangs; cheap cases are decided here first (identical strings, two plain integers) and the
  verdicts (not the timeouts) are cached. Answers are never evaluated as Python.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from lit_gcpo.rewards.sandbox import default_pool

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SCIENTIFIC = re.compile(r"([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)")
_GSM8K_MARK = "####"

MAX_ANSWER_CHARS = 2000
"""Answers longer than this are not sent to Math-Verify (no real answer is; a flood of text could be)."""


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` whose braces balance.

    Escaped braces ``\\{`` and ``\\}`` are content, not structure. A last box left open (a truncated
    completion) is skipped in favour of the previous complete one. Returns the stripped content, or
    None when there is no complete box. Linear in ``len(text)``.
    """
    if not isinstance(text, str) or ("\\boxed" not in text and "\\fbox" not in text):
        return None
    opens = [m.end() - 1 for m in _BOX_OPEN.finditer(text)]  # index of each box's "{"
    if not opens:
        return None
    # One pass matching every structural brace; only the boxes' own braces are kept.
    wanted = set(opens)
    closing: dict[int, int] = {}
    stack: list[int] = []
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "{":
            stack.append(index)
        elif char == "}" and stack:
            start = stack.pop()
            if start in wanted:
                closing[start] = index
    for start in reversed(opens):
        if start in closing:
            return text[start + 1 : closing[start]].strip()
    return None


def ends_with_box(text: str) -> bool:
    """Whether ``text`` ends with a complete ``\\boxed{...}`` / ``\\fbox{...}`` (trailing whitespace allowed).

    True for ``3+4=\\boxed{7}`` and ``\\boxed{\\frac{1}{2}}\\n``; False for ``\\boxed{6}0}00`` (the box
    closes before the end: what follows is junk), ``\\boxed{6`` (left open) and text without a box.
    """
    if not isinstance(text, str):
        return False
    text = text.rstrip()
    last_open = max(_BOX_OPEN.finditer(text), key=lambda match: match.start(), default=None)
    if last_open is None or not text.endswith("}"):
        return False
    # The last box must be the one closed by the final brace: its content then is all that lies between,
    # which is what extract_boxed reads only when the braces in between balance.
    return extract_boxed(text) == text[last_open.end() : -1].strip()


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text


_INLINE_MATH = re.compile(r"(?<!\\)\$+(.*?)(?<!\\)\$+", re.DOTALL)
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_LIST_GLUE = re.compile(r"[,;\s]|\band\b")


def _unwrap_math(text: str) -> str:
    """The gold as a model would box it: ``$...$`` delimiters removed, also inside the text.

    ``"$16$"`` -> ``"16"``; ``"$69$,$84$"`` (OlympiadBench lists several answers in one string) ->
    ``"69, 84"``; ``"$x=1$ or $x=2$"`` -> ``"x=1 or x=2"``. Escaped dollars (``\\$5``) are content.
    """
    text = text.strip()
    if len(_UNESCAPED_DOLLAR.findall(text)) <= 2 or (text.startswith("$$") and text.count("$") == 4):
        return _strip_dollars(text)
    spans = list(_INLINE_MATH.finditer(text))
    if not _LIST_GLUE.sub("", _INLINE_MATH.sub("", text)):
        return ", ".join(span.group(1).strip() for span in spans)  # several math answers in one string
    return _INLINE_MATH.sub(lambda span: span.group(1), text).strip()


def _normalise_number(text: str) -> str:
    """``"1,234"`` -> ``"1234"``, ``"025"`` -> ``"25"``, ``"27.0"`` -> ``"27"``; anything else unchanged."""
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return text
    value = Decimal(text)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gold_answer(value: Any) -> str | None:
    """One gold answer string from a benchmark's gold field, or None when there is none.

    Formats handled (first match wins):

    * ``None``, NaN, booleans, empty strings and empty lists -> None;
    * numbers: ``27.0`` -> ``"27"``, ``0.5`` -> ``"0.5"``;
    * a list (OlympiadBench ``final_answer``): each element normalised, several joined by ``", "``;
    * GSM8K text ``"... #### 1,234"``: what follows the last ``####``, thousands separators removed;
    * a full solution with a ``\\boxed{}`` (Minerva, MATH ``solution``): the last box's content;
    * otherwise the string, with its ``$...$`` delimiters removed (also inner ones: OlympiadBench's
      ``"$69$,$84$"`` -> ``"69, 84"``); a plain number loses leading zeros and
      thousands separators (AIME ``"025"`` -> ``"25"``).
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return _normalise_number(repr(value) if isinstance(value, float) else str(value))
    if isinstance(value, (list, tuple)):
        parts = [gold_answer(v) for v in value]
        if not parts or any(p is None for p in parts):
            return None
        return ", ".join(p for p in parts if p is not None)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _GSM8K_MARK in text:
        text = text.rsplit(_GSM8K_MARK, 1)[1].strip()
    elif "\\boxed" in text or "\\fbox" in text:
        boxed = extract_boxed(text)
        if boxed is None:
            return None
        text = boxed
    text = _unwrap_math(text)
    return _normalise_number(text) or None


def _prepare(answer: str) -> str:
    """The canonical form compared and sent to Math-Verify (also the cache key)."""
    text = _strip_dollars(answer).rstrip(".").strip()
    text = _normalise_number(text)
    scientific = _SCIENTIFIC.fullmatch(text)
    if scientific:  # Math-Verify reads "4.6e-24" as 4.6 * Euler's e - 24
        text = f"{scientific.group(1)}\\times 10^{{{int(scientific.group(2))}}}"
    return text


def answers_equivalent(a: str, b: str, timeout_s: float = 2.0) -> bool:
    """Whether two answer strings are mathematically equivalent per Math-Verify.

    ``a`` takes Math-Verify's gold role and ``b`` the prediction's (``verify`` is asymmetric only for
    assignments such as ``x = 5`` and equation/interval conversions). Both are answer texts (e.g. the
    content of a ``\\boxed{}``), not whole completions. The call returns within about
    ``1.25 * timeout_s + 0.2`` seconds from any thread (plus the wait for the grading process when
    another thread is using it, or when it is still starting); a comparison that times out counts as
    not equivalent (and is not cached, since a loaded machine may be the cause). Raises
    ``lit_gcpo.rewards.sandbox.GraderUnavailableError`` when the grading process cannot run at all (an
    infrastructure failure, not a wrong answer).
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    a, b = _prepare(a), _prepare(b)
    if not a or not b:
        return False
    if a == b:
        return True
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    if _is_integer(a) and _is_integer(b):
        return False  # both canonical integers and different strings
    try:
        return _equivalent_cached(a, b, float(timeout_s))
    except _GradingTimedOut:
        return False


def _is_integer(text: str) -> bool:
    try:
        return _PLAIN_NUMBER.fullmatch(text) is not None and Decimal(text) == int(Decimal(text))
    except InvalidOperation:
        return False


class _GradingTimedOut(Exception):
    """Raised through the cache so that timeouts (which may come from a loaded machine) are not cached."""


@lru_cache(maxsize=65536)
def _equivalent_cached(a: str, b: str, timeout_s: float) -> bool:
    result = default_pool().grade(a, b, timeout_s)
    if result.timed_out:
        raise _GradingTimedOut
    return result.equal
