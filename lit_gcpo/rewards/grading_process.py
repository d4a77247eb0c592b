"""The Math-Verify grading process's own code: ``lit_gcpo.rewards.sandbox.GraderProcess`` runs this file as
``python -I grading_process.py``, and it imports only the standard library and ``math_verify`` (sympy through it):
no torch, no project package.

It reads one JSON request per line on stdin and answers one JSON line on stdout: a comparison
(``{"gold", "pred", "timeout"}`` -> ``{"equal", "timed_out", "error"}``) or an extraction (``{"extract", "timeout"}``
-> ``{"answer", "timed_out", "error"}``). A ``setitimer`` alarm stops slow Python-level work after the request's
timeout (the process survives); an exception Math-Verify raises is answered with its type and message; the address
space is limited (``CHILD_MEMORY_LIMIT_BYTES``) so a runaway expansion raises ``MemoryError``. What this process
cannot answer (a hang in C code, a crash) the parent bounds and reports (``lit_gcpo.rewards.sandbox``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

CHILD_MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Address-space limit of the grading process."""

RELATIVE_TOLERANCE = 1e-4
"""Two real numbers Math-Verify calls equal must also agree to this relative difference."""

MAX_ERROR_CHARS = 300
"""How much of an exception's message the grading process reports."""


class _Alarm(BaseException):  # not an Exception: Math-Verify's `except Exception` must not swallow it
    pass


def _on_alarm(signum: int, frame: object) -> None:  # pragma: no cover - runs in the child interpreter
    raise _Alarm


def _relatively_close(gold: list, pred: list) -> bool:  # pragma: no cover - runs in the child interpreter
    """False only for two real numbers further apart than ``RELATIVE_TOLERANCE`` of the larger."""
    import sympy

    a, b = gold[0], pred[0]
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number):
        return True  # sets, tuples, equations, symbols: Math-Verify's verdict stands
    x, y = a.evalf(30), b.evalf(30)
    if not (x.is_real and y.is_real):
        return True
    scale = max(abs(x), abs(y))
    return bool(scale == 0 or abs(x - y) <= RELATIVE_TOLERANCE * scale)


def _extract(text: str, timeout: float, config: list) -> dict[str, Any]:  # pragma: no cover - runs in the child
    """``{"answer", "timed_out", "error"}``: the string Math-Verify extracted from a whole text (``parse`` gives
    ``[expression, string]``; None when it finds nothing), within ``timeout`` seconds; ``error``: the type and message
    of an exception it raised instead."""
    from math_verify import parse

    answer, timed_out, error = None, False, None
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            found = parse(text, extraction_config=config, parsing_timeout=None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        answer = str(found[-1]) if len(found) >= 2 else None
    except _Alarm:
        timed_out = True
    except Exception as failure:
        error = _describe(failure)
    return {"answer": answer, "timed_out": timed_out, "error": error}


def _describe(failure: BaseException) -> str:  # pragma: no cover - runs in the child interpreter
    """``Type: message`` of an exception, on one line, at most ``MAX_ERROR_CHARS``."""
    return " ".join(f"{type(failure).__name__}: {failure}".split())[:MAX_ERROR_CHARS]


def _grade(gold_text: str, pred_text: str, timeout: float, config: list) -> dict[str, Any]:  # pragma: no cover
    """``{"equal", "timed_out", "error"}`` for one request: Math-Verify's verdict on the two answers (as LaTeX
    math), within ``timeout`` seconds, and real numbers also relatively close (``_relatively_close``); ``error``:
    the type and message of an exception it raised instead (a ``MemoryError`` at the address-space limit too)."""
    from math_verify import parse, verify

    equal, timed_out, error = False, False, None
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            gold = parse(f"${gold_text}$", extraction_config=config, parsing_timeout=None)
            pred = parse(f"${pred_text}$", extraction_config=config, parsing_timeout=None)
            equal = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
            equal = equal and _relatively_close(gold, pred)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm:
        timed_out = True
    except Exception as failure:
        equal, error = False, _describe(failure)
    return {"equal": equal, "timed_out": timed_out, "error": error}


def _child_main() -> None:  # pragma: no cover - runs in the child interpreter
    import logging
    import resource

    # An expression that expands without bound hits MemoryError (caught in _grade) instead of the machine's RAM.
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_LIMIT_BYTES, CHILD_MEMORY_LIMIT_BYTES))

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints must not corrupt the protocol on stdout
    logging.disable(logging.CRITICAL)
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    signal.signal(signal.SIGALRM, _on_alarm)
    # Math-Verify builds its parser and regexes lazily: pay that before "ready", not in the first request.
    verify(parse("$\\frac{1}{2}$", extraction_config=config), parse("$0.5$", extraction_config=config))
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "extract" in request:
            reply = _extract(request["extract"], float(request["timeout"]), config)
        else:
            reply = _grade(request["gold"], request["pred"], float(request["timeout"]), config)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":  # pragma: no cover
    _child_main()
