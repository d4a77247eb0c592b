"""The environments ``bench_vs_trl.py`` runs both frameworks in, and how it tells whether the machine was quiet.

Environments (``ENVIRONMENTS``; each run's process gets the variables of its framework, nothing else differs):

- ``as-a-user``: each framework as its users run it: TRL with OpenMP's default wait policy (TRL sets none),
  lit-gcpo with what its CLI does by default (``lit_gcpo.running.wait_policy``: OpenMP's default unless the vLLM
  CPU build is installed). No ``OMP_WAIT_POLICY`` in either environment.
- ``ACTIVE``: ``OMP_WAIT_POLICY=ACTIVE`` for both (threads spin between parallel regions).
- ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE`` for both (threads sleep at once).
- ``loaded``: ``as-a-user`` while the script keeps a fixed background load running: one single-threaded
  busy loop (a Python ``while True: pass`` process) per core, started before the run and stopped after it.
  What a user gets on a machine that other jobs share.
- ``same-length`` (only with ``bench_vs_trl.py --same-length``): ``as-a-user`` with every completion exactly
  ``max_new_tokens`` long on both sides (the end-of-sequence ids suppressed until then: lit-gcpo's
  ``data.sampling.min_tokens``, TRL's ``generation_kwargs={"min_new_tokens": ...}``). A control for equal work: with
  random weights EOS falls where each sampler's draws put it, so the other rows' completions differ in length
  (20m, 2026-12-07: 5,425 tokens a step for lit-gcpo, 4,797 for TRL). Never the headline.

Quiet or not, measured per run (robust to what the load average misses or lags):

- the 1-minute load average before and after the run (``os.getloadavg``);
- the **foreign CPU share**: the CPU time the whole machine spent busy during the run (``/proc/stat``'s first
  line: every field but ``idle`` and ``iowait``, in clock ticks) minus the run's own CPU time (its process and
  its children's, ``user + sys`` from ``wait4``'s rusage), over wall time x cores. 0: nothing else ran;
  0.5 on 2 cores: another process kept one core busy throughout.

A quiet environment's rows are written to ``RESULTS.md`` only when every one of its runs had a foreign share of
at most ``QUIET_SHARE``; the ``loaded`` row only when its runs had at least ``LOADED_SHARE`` (the load was there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

QUIET_SHARE = 0.10
"""Most foreign CPU share a quiet run may have: on 2 cores, a tenth of the machine busy with other work (the
step's noise at that level is within the repeats' spread, a few percent)."""
LOADED_SHARE = 0.35
"""Least foreign CPU share a ``loaded`` run must show. One busy loop per core against a run whose two threads spin
(TRL under OpenMP's default) share the cores four ways: the loops then hold about 0.5; 0.35 leaves room for the
scheduler's unevenness and still means most of a core went to the load throughout."""
BUSY_LOOP = (
    "import os, time\n"
    "parent, end = os.getppid(), time.monotonic() + {lifetime}\n"
    "while os.getppid() == parent and time.monotonic() < end:\n"
    "    for _ in range(100_000):\n"
    "        pass\n"
)
"""One core's busy loop; it ends by itself when the script that started it is gone (killed without cleaning
up) or after its lifetime."""


@dataclass(frozen=True)
class Environment:
    """One labelled environment: ``OMP_WAIT_POLICY`` per framework (None: not set), the background load and whether
    both sides generate completions of the same length."""

    label: str
    wait_policy: dict[str, str | None]
    loaded: bool = False
    description: str = ""
    same_length: bool = False  # every completion max_new_tokens long on both sides

    def variables(self, framework: str) -> dict[str, str]:
        """The variables this environment sets for ``framework``'s process (and those it removes: value None)."""
        return {"OMP_WAIT_POLICY": self.wait_policy[framework]}


ENVIRONMENTS = {
    "as-a-user": Environment(
        "as-a-user",
        {"trl": None, "lit": None},
        description="each as its users run it: TRL with OpenMP's default wait policy, lit-gcpo with its CLI's",
    ),
    "ACTIVE": Environment("ACTIVE", {"trl": "ACTIVE", "lit": "ACTIVE"}, description="OMP_WAIT_POLICY=ACTIVE for both"),
    "PASSIVE": Environment(
        "PASSIVE", {"trl": "PASSIVE", "lit": "PASSIVE"}, description="OMP_WAIT_POLICY=PASSIVE for both"
    ),
    "loaded": Environment(
        "loaded",
        {"trl": None, "lit": None},
        loaded=True,
        description="as-a-user, with one single-threaded busy process per core running throughout",
    ),
    "same-length": Environment(
        "same-length",
        {"trl": None, "lit": None},
        same_length=True,
        description="as-a-user, every completion exactly the most new tokens long on both sides (EOS suppressed "
        "until then: lit-gcpo data.sampling.min_tokens, TRL min_new_tokens), a control for equal work",
    ),
}


def run_environment(base: dict[str, str], environment: Environment, framework: str) -> dict[str, str]:
    """``base`` with ``environment``'s variables for ``framework`` set or removed."""
    env = dict(base)
    for name, value in environment.variables(framework).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# ------------------------------------------------------------------------------------------ machine load
def busy_ticks(stat_text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks of all CPUs from the text of ``/proc/stat``: its ``cpu`` line's fields are
    user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user/nice, so
    the total is the first eight, and busy is that minus idle and iowait."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:9]]
            total = sum(ticks)
            return total - ticks[3] - ticks[4], total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def read_proc_stat() -> str:
    with open("/proc/stat") as handle:
        return handle.read()


def foreign_share(
    stat_before: str, stat_after: str, own_cpu_s: float, wall_s: float, cores: int, ticks_per_s: float
) -> float:
    """The share of the machine's capacity (wall x cores) that other processes used during a run: busy ticks
    between the two ``/proc/stat`` snapshots, in seconds, minus the run's own CPU time; at least 0 (the two
    clocks are sampled at slightly different moments)."""
    busy = (busy_ticks(stat_after)[0] - busy_ticks(stat_before)[0]) / ticks_per_s
    return max(0.0, (busy - own_cpu_s) / (wall_s * cores))


def refused_runs(runs: list[dict], environments: dict[str, Environment]) -> list[str]:
    """Why some rows may not be written, one message per run that breaks the rule (empty: all may): a quiet
    environment's run with a foreign share above ``QUIET_SHARE``, or a ``loaded`` run below ``LOADED_SHARE``.
    Each run is a dict with ``environment``, ``size``, ``beta``, ``framework``, ``repeat`` and ``foreign_share``."""
    messages = []
    for run in runs:
        share = run["foreign_share"]
        name = f"{run['environment']} {run['size']} beta {run['beta']:g} {run['framework']} repeat {run['repeat']}"
        if environments[run["environment"]].loaded:
            if share < LOADED_SHARE:
                messages.append(f"{name}: foreign CPU share {share:.2f} < {LOADED_SHARE} (the load was not there)")
        elif share > QUIET_SHARE:
            messages.append(f"{name}: foreign CPU share {share:.2f} > {QUIET_SHARE} (the machine was not quiet)")
    return messages


@dataclass
class BackgroundLoad:
    """One single-threaded busy process per core while open (the ``loaded`` environment), each ending by itself
    after ``lifetime_s`` at the latest."""

    cores: int
    lifetime_s: float = 7200.0
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> BackgroundLoad:
        code = BUSY_LOOP.format(lifetime=self.lifetime_s)
        self.processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.cores)]
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()
        self.processes = []


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
