"""Which ``OMP_WAIT_POLICY`` ``lit-gcpo`` runs under, decided before torch is imported (OpenMP reads it once):
``PASSIVE``, unless the user set the variable.

OpenMP's threads, between two parallel regions, either spin for a while (its default, and ``ACTIVE`` longer)
or sleep at once (``PASSIVE``). Measured on a 2-core CPU (``benchmarks/bench_wait_policy.py``, 2026-12-07,
lit-gcpo alone on the tiny work of ``bench_vs_trl.py``, median step over 2 interleaved repeats; RESULTS.md section
``wait_policy``):

- ``hf`` engine, quiet machine: OpenMP's default 0.137 s, ``ACTIVE`` 0.130 s, ``PASSIVE`` 0.140 s (2 % above the
  default, 8 % above ``ACTIVE``; CPU per step 0.19, 0.26, 0.18 s).
- ``hf`` engine, one busy process per core beside it: ``ACTIVE`` 0.367 s, ``PASSIVE`` 0.273 s; earlier, on the
  machine shared with two comparison runners, OpenMP's default took 6.3 s a step and ``PASSIVE`` 1.2 s.
- ``vllm`` CPU engine in the trainer's process: quiet ``ACTIVE`` 0.201 s, ``PASSIVE`` 0.232 s; loaded ``ACTIVE``
  4.9 s, ``PASSIVE`` 0.50 s (its thread pool and the trainer's spin against each other; shared/VLLM_NOTES.md).

So ``PASSIVE`` always: it costs 2-15 % on an idle machine and saves 1.3-10x as soon as anything else wants the
cores, and a load that arrives after the start (a second run, an evaluation, a test suite) cannot be foreseen. The
earlier rule (``PASSIVE`` only with the vLLM CPU build or when a 0.1 s sample at start saw a busy machine) made
the same config behave differently by the moment it started, for a 2 % gain. Whoever wants the spin sets
``OMP_WAIT_POLICY=ACTIVE`` (or any value): a value already in the environment is left as it is.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping

VARIABLE = "OMP_WAIT_POLICY"
DEFAULT = "PASSIVE"


def choose_wait_policy(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """``(value, why)``: the ``OMP_WAIT_POLICY`` to set (None: leave the environment as it is) and the reason."""
    if VARIABLE in environ:
        return None, f"{VARIABLE}={environ[VARIABLE]} from the environment"
    return DEFAULT, f"{DEFAULT}: lit-gcpo's default (lit_gcpo.running.wait_policy has the measurements)"


def wait_policy_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set in ``environ`` (``{"OMP_WAIT_POLICY": value}`` or nothing)."""
    value, _ = choose_wait_policy(environ)
    return {} if value is None else {VARIABLE: value}
