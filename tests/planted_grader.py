"""The Math-Verify grading process of ``lit_gcpo.rewards.sandbox``, with planted failures (test_grader_failures.py).

    python -I planted_grader.py PATH_OF_SANDBOX_PY

It runs the sandbox's own child loop, with Math-Verify's ``verify`` wrapped: a prediction whose text is ``13579``
makes it raise ``ValueError``; ``24680`` ends the process with status 3 in the middle of the comparison (what a
segfault in a C extension does, without the core file). Every other comparison is Math-Verify's own.
"""

from __future__ import annotations

import os
import runpy
import sys

import math_verify

RAISES, DIES = "13579", "24680"
_verify = math_verify.verify


def _planted_verify(gold, pred, **kwargs):
    text = str(pred[-1]) if pred else ""
    if text == RAISES:
        raise ValueError(f"planted failure in verify for {text}")
    if text == DIES:
        os._exit(3)
    return _verify(gold, pred, **kwargs)


math_verify.verify = _planted_verify  # the child imports verify from math_verify at each comparison

if __name__ == "__main__":
    runpy.run_path(sys.argv[1], run_name="__main__")  # the sandbox's child loop, as `python -I sandbox.py` runs it
