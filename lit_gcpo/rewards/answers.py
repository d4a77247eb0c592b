"""Final answers of math completions and benchmark golds: extraction, normalisation, equivalence.

* ``extract_boxed`` returns the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces
  balance, in one linear pass (no regex backtracking, no recursion: 10,000 nested braces or a
  megabyte of text cost a few milliseconds).
* ``gold_answer`` turns the gold fields of the usual benchmarks into one answer string (see its
  docstring for the formats).
* ``answers_equivalent`` decides equivalence with Math-Verify (``parse`` + ``verify``) in a separate,
  killable process (``lit_gcpo.rewards.sandbox``) so the time bound holds in any thread and against
  C-level hangs; cheap cases are decided here first (identical strings, two plain integers) and the
  verdicts (not the timeouts and failures) are cached. ``compare_answers`` also says why a comparison got no
  verdict: a timeout (with the time limit), an exception in Math-Verify (its type and message) or the grading
  process dying on it; callers report it with the row. Answers are never evaluated as Python.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from lit_gcpo.rewards.sandbox import default_pool

log = logging.getLogger(__name__)

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_SPACE = r"(?:\s|\$|\\[()\[\]])*"  # whitespace and math delimiters
_BOX_GLUE = re.compile(rf"{_MATH_SPACE}(?:,{_MATH_SPACE}(?:and|or)\b|,|\band\b|\bor\b){_MATH_SPACE}")
_ANY_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:(?:,|\s|\\,|\\ |\{,\})\d{3})+(?:\.\d+)?")
_THOUSANDS_SEPARATOR = re.compile(r",|\s|\\,|\\ |\{,\}")
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,(?!\d{3}$)\d+")  # "3,75": not a group of three (that is 3,750 = 3750)
_PERCENT = re.compile(r"\s*(?:\\?%|\\text\{\s*\\?%\s*\}|\s[Pp]ercent)$")
_SCIENTIFIC = re.compile(r"([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)")
_GSM8K_MARK = "####"

MAX_ANSWER_CHARS = 2000
"""Answers longer than this are not sent to Math-Verify (no real answer is; a flood of text could be)."""


def _complete_boxes(text: str) -> list[tuple[int, int, int]]:
    """``(start of "\\boxed", index of its "{", index of its "}")`` of every complete box, in order of start.

    One pass matching every structural brace; escaped braces ``\\{`` / ``\\}`` are content.
    """
    if not isinstance(text, str) or ("\\boxed" not in text and "\\fbox" not in text):
        return []
    starts = {m.end() - 1: m.start() for m in _BOX_OPEN.finditer(text)}  # the box's "{" -> its backslash
    if not starts:
        return []
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
            if start in starts:
                closing[start] = index
    return [(starts[brace], brace, closing[brace]) for brace in sorted(closing)]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` whose braces balance.

    Escaped braces ``\\{`` and ``\\}`` are content, not structure. A last box left open (a truncated
    completion) is skipped in favour of the previous complete one. Returns the stripped content, or
    None when there is no complete box. Linear in ``len(text)``.
    """
    boxes = _complete_boxes(text)
    if not boxes:
        return None
    _, brace, close = boxes[-1]
    return text[brace + 1 : close].strip()


def final_answer(text: str) -> str | None:
    """The final answer of a math completion: its last complete box, with the boxes listed right before it.

    Boxes separated by one comma, "and" or "or" (", and", ", or"), with whitespace and math delimiters around
    it, form one answer, their contents joined by ``", "`` (Math-Verify's reading of ``\\boxed{3}, \\boxed{5}``:
    the set {3, 5}); boxes with nothing between them (``\\boxed{6}\\boxed{6}``) are a repetition, not a list.
    So a multi-part answer boxed part by part matches a multi-part gold, and a hedge (``\\boxed{3} or
    \\boxed{5}``) matches neither 3 nor 5. Boxes apart in the text (an intermediate result boxed earlier) are
    not part of it. None when there is no complete box.
    """
    boxes = _complete_boxes(text)
    if not boxes:
        return None
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        _, _, close = box
        if close > group[0][0] or not _BOX_GLUE.fullmatch(text[close + 1 : group[0][0]]):
            break  # a box around the later one, or text between them
        group.insert(0, box)
    return ", ".join(text[brace + 1 : close].strip() for _, brace, close in group)


FALLBACKS = ("none", "last_number", "math_verify")
"""How an answer is read from a completion without a box (``unboxed_answer``)."""

MAX_EXTRACT_CHARS = 100_000
"""Completions longer than this are not sent to Math-Verify's extraction (the fallback gives no answer)."""


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands commas dropped), or None: the fallback of the
    Qwen2.5-Math evaluation for a completion without a box (its ``use_last_number``)."""
    found = _ANY_NUMBER.findall(text) if isinstance(text, str) else []
    return found[-1].replace(",", "") if found else None


@dataclass(frozen=True)
class Extraction:
    """The answer a fallback read from a completion without a box (None: none); ``problem``: why Math-Verify's
    extraction gave no result (``answer`` is then None, as when it finds nothing): ``extraction timed out after
    1 s``, ``Math-Verify raised ...`` or ``the grading process ... during the extraction``."""

    answer: str | None
    problem: str | None = None


def read_unboxed(text: str, fallback: str, timeout_s: float = 2.0) -> Extraction:
    """The answer of a completion that has no box, read by ``fallback``, and why there is none when the reading
    failed.

    * ``none``: no answer (a completion must box its answer);
    * ``last_number``: the last number in the text (Qwen2.5-Math's evaluation, ``use_last_number``);
    * ``math_verify``: Math-Verify's LaTeX extraction of the whole text ("final answer is ...", then the
      last LaTeX expression), in the killable grading process and within ``timeout_s``; its
      ``ExprExtractionConfig`` (plain-text expressions) is not used: it evaluates Python. An extraction that
      times out, raises or crashes the grading process gives no answer, with its ``problem``.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"answer fallback must be one of {FALLBACKS}, got {fallback!r}")
    if fallback == "none" or not isinstance(text, str):
        return Extraction(None)
    if fallback == "last_number":
        return Extraction(last_number(text))
    if len(text) > MAX_EXTRACT_CHARS:
        return Extraction(None)
    result = default_pool().extract(text, float(timeout_s))
    if result.timed_out:
        return Extraction(None, f"extraction timed out after {timeout_s:g} s (the time limit of one Math-Verify call)")
    return Extraction(result.answer, result.error)


def unboxed_answer(text: str, fallback: str, timeout_s: float = 2.0) -> str | None:
    """``read_unboxed(text, fallback, timeout_s).answer``: for callers that have no row to report a failure with."""
    return read_unboxed(text, fallback, timeout_s).answer


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
    """``"1,234"``, ``"1 234"``, ``"1\\,234"`` -> ``"1234"``, ``"025"`` -> ``"25"``, ``"27.0"`` -> ``"27"``;
    anything else unchanged."""
    if _THOUSANDS.fullmatch(text):
        text = _THOUSANDS_SEPARATOR.sub("", text)
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
    # A trailing backslash ("42\\") would escape the "$" that closes the text sent to Math-Verify.
    text = _strip_dollars(answer).rstrip(".").strip().rstrip("\\").strip()
    text = _normalise_number(text)
    scientific = _SCIENTIFIC.fullmatch(text)
    if scientific:  # Math-Verify reads "4.6e-24" as 4.6 * Euler's e - 24
        text = f"{scientific.group(1)}\\times 10^{{{int(scientific.group(2))}}}"
    return text


@dataclass(frozen=True)
class Verdict:
    """Whether two answers are equivalent; ``problem``: why Math-Verify gave no verdict (``equal`` is then False,
    the existing policy: such a comparison counts as not equivalent): ``timed out after 1 s (...)``, ``Math-Verify
    raised ValueError: ...``, or ``the grading process was killed by signal 9 (...) during the comparison``."""

    equal: bool
    problem: str | None = None


def answers_equivalent(a: str, b: str, timeout_s: float = 2.0) -> bool:
    """``compare_answers(a, b, timeout_s).equal``: for callers that have no row to report a missing verdict with."""
    return compare_answers(a, b, timeout_s).equal


def compare_answers(a: str, b: str, timeout_s: float = 2.0) -> Verdict:
    """Whether two answer strings are mathematically equivalent per Math-Verify, and why there is no verdict.

    ``a`` takes Math-Verify's gold role and ``b`` the prediction's (``verify`` is asymmetric only for
    assignments such as ``x = 5`` and equation/interval conversions). Both are answer texts (e.g. the
    content of a ``\\boxed{}``), not whole completions. The call returns within about
    ``1.25 * timeout_s + 0.2`` seconds from any thread (plus the wait for the grading process when
    another thread is using it, or when it is still starting); a comparison without a verdict (a timeout,
    an exception in Math-Verify, the grading process dying on it) counts as not equivalent, says why in
    ``problem`` and is not cached (a loaded machine may be the cause). Raises
    ``lit_gcpo.rewards.sandbox.GraderUnavailableError`` when the grading process cannot run at all (an
    infrastructure failure, not a wrong answer).
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return Verdict(False)
    a, b = _prepare(a), _prepare(b)
    if not a or not b:
        return Verdict(False)
    if _PLAIN_NUMBER.fullmatch(a) and _DECIMAL_COMMA.fullmatch(b):
        b = _normalise_number(b.replace(",", "."))  # one number against one: a list "3, 75" cannot match it
    if a == b or _same_percentage(a, b):
        return Verdict(True)
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return Verdict(False)
    if _is_integer(a) and _is_integer(b):
        return Verdict(False)  # both canonical integers and different strings
    try:
        return Verdict(_equivalent_cached(a, b, float(timeout_s)))
    except _NoVerdict as missing:
        return Verdict(False, str(missing))


def _same_percentage(a: str, b: str) -> bool:
    """``12.5`` against ``12.5\\%``: one number, stated as a percentage on one side only (Math-Verify reads
    ``12.5\\%`` as 0.125, and keeps deciding every other pairing)."""
    a_bare, b_bare = _PERCENT.sub("", a), _PERCENT.sub("", b)
    if (a_bare == a) == (b_bare == b):
        return False  # a percent sign on both sides or on neither
    a_bare, b_bare = _normalise_number(a_bare.strip()), _normalise_number(b_bare.strip())
    return a_bare == b_bare and _PLAIN_NUMBER.fullmatch(a_bare) is not None


def _is_integer(text: str) -> bool:
    try:
        return _PLAIN_NUMBER.fullmatch(text) is not None and Decimal(text) == int(Decimal(text))
    except InvalidOperation:
        return False


class _NoVerdict(Exception):
    """Raised through the cache so that comparisons without a verdict (a timeout may come from a loaded machine)
    are not cached; the message says why."""


@lru_cache(maxsize=65536)
def _equivalent_cached(a: str, b: str, timeout_s: float) -> bool:
    result = default_pool().grade(a, b, timeout_s)
    if result.timed_out:
        raise _NoVerdict(f"timed out after {timeout_s:g} s (the time limit of one Math-Verify comparison)")
    if result.error is not None:
        raise _NoVerdict(result.error)
    return result.equal


def report_missing_verdicts(
    what: str,
    problems: list[str],
    total: int,
    shown: int = 5,
    outcome: tuple[str, str] = ("", "scored as not equivalent"),
) -> None:
    """One warning for the comparisons of a batch of ``total`` completions that got no verdict (``problems``: one
    line each, naming the rows); ``outcome``: what was counted (nothing said: completions) and what became of them."""
    if not problems:
        return
    counted, became = outcome
    more = f"; (+{len(problems) - shown} more)" if len(problems) > shown else ""
    log.warning(
        "%s: no Math-Verify verdict for %d%s of %d completions, %s: %s%s",
        what,
        len(problems),
        f" {counted}" if counted else "",
        total,
        became,
        "; ".join(problems[:shown]),
        more,
    )
