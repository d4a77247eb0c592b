"""The Math-Verify grading process (``lit_gcpo.rewards.grading_process``), with planted failures
(test_grader_failures.py).

    python -I planted_grader.py PATH_OF_GRADING_PROCESS_PY

It runs the grading process's own loop, with Math-Verify's ``verify`` and ``parse`` wrapped. A comparison whose
prediction's text is ``13579`` makes ``verify`` raise ``ValueError``; ``24680`` ends the process with status 3 in the
middle of the comparison (what a segfault in a C extension does, without the core file); ``97531`` sleeps past any
time limit in Python code (the process's own alarm stops it). An extraction (``parse`` of a whole completion) whose
text contains ``EXTRACT-RAISES``, ``EXTRACT-DIES`` or ``EXTRACT-SLEEPS`` does the same. Everything else is
Math-Verify's own.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import math_verify

RAISES, DIES, SLEEPS = "13579", "24680", "97531"
_verify, _parse = math_verify.verify, math_verify.parse


def _planted(text: str, raises: str, dies: str, sleeps: str, where: str) -> None:
    if raises in text:
        raise ValueError(f"planted failure in {where} for {raises}")
    if dies in text:
        os._exit(3)
    if sleeps in text:
        time.sleep(600)


def _planted_verify(gold, pred, **kwargs):
    text = str(pred[-1]) if pred else ""
    if text in (RAISES, DIES, SLEEPS):
        _planted(text, RAISES, DIES, SLEEPS, "verify")
    return _verify(gold, pred, **kwargs)


def _planted_parse(text, *args, **kwargs):
    _planted(str(text), "EXTRACT-RAISES", "EXTRACT-DIES", "EXTRACT-SLEEPS", "parse")
    return _parse(text, *args, **kwargs)


# the grading process imports verify and parse from math_verify at each request
math_verify.verify, math_verify.parse = _planted_verify, _planted_parse

if __name__ == "__main__":
    runpy.run_path(sys.argv[1], run_name="__main__")  # the grading process's loop, as `python -I <file>` runs it
