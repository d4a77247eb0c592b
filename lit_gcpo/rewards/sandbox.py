"""Killable child processes (``ChildProcess``), and Math-Verify grading in one: a time bound that works
from any thread. User reward functions run in the same kind of child (``lit_gcpo.rewards.isolated``).

Math-Verify bounds ``parse``/``verify`` with ``signal.alarm``, which only works in the main thread of
the main interpreter (Lightning and dataloader threads get a ``ValueError``) and cannot interrupt a
computation that sits in C code: ``verify`` on ``9^{9^{9^{9}}}`` keeps one core busy far past any
alarm. So the grading runs in a child interpreter started with ``python -I <this file>``:

* the child imports only the standard library and ``math_verify`` (no torch, no project package, no
  ``__main__`` re-import as ``multiprocessing``'s spawn would do), and reads one JSON request per line
  on stdin, answering one JSON line on stdout;
* inside the child a ``setitimer`` alarm stops slow Python-level work after ``timeout_s`` (cheap: the
  process survives);
* the parent waits ``timeout_s * 1.25 + 0.2`` seconds for the answer; past that (C-level hang) or when
  the child dies on an input, it kills the child and starts a replacement at once in the background; the
  comparison is reported as a timeout when the child was still running at the bound, and as a crash, with
  the child's exit status, when it died (``GradeResult``);
* an exception Math-Verify raises is reported with its type and message (``GradeResult.error``), not taken
  for a "not equal" verdict;
* the child's address space is limited (``CHILD_MEMORY_LIMIT_BYTES``) so a runaway expansion raises
  ``MemoryError`` instead of eating the machine's memory;
* besides comparisons, the child answers extraction requests: the answer Math-Verify's LaTeX extraction
  finds in a whole completion (``GraderProcess.extract``, the ``math_verify`` fallback of
  ``lit_gcpo.rewards.answers.unboxed_answer``), under the same bounds.

Numbers far below 1: Math-Verify compares two numbers after rounding them to 6 decimals, so
``2.88 \\times 10^{-19}`` "equals" ``1.325 \\times 10^{-27}`` and ``-5 \\times 10^{-19}``. When both sides parse
to real numbers, a Math-Verify "equal" must also pass a relative test, ``|a - b| <= RELATIVE_TOLERANCE *
max(|a|, |b|)`` (the ``rel_tol`` of the Qwen2.5-Math evaluation's ``isclose``). The test only ever turns
"equal" into "not equal", and for numbers of size 0.01 or more Math-Verify's rounding is already
stricter, so it changes nothing there.

Only ``LatexExtractionConfig`` is used: Math-Verify's ``ExprExtractionConfig`` goes through
``sympy.parse_expr``, which evaluates Python, and model outputs are untrusted text.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")

EXIT_WAIT_S = 1.0
"""Seconds to wait, once a child closed its stdout mid-request, for its exit status (it is dying)."""

STARTUP_TIMEOUT_S = 60.0
"""Seconds a fresh child may take to import Math-Verify (a loaded 2-core machine needs ~1-3 s)."""


CHILD_MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Address-space limit of the grading process."""

RELATIVE_TOLERANCE = 1e-4
"""Two real numbers Math-Verify calls equal must also agree to this relative difference."""


class ChildUnavailableError(RuntimeError):
    """A child process could not be started or died for a reason other than a timeout."""


class GraderUnavailableError(ChildUnavailableError):
    """The grading process could not be started or died for a reason other than a timeout."""


MAX_ERROR_CHARS = 300
"""How much of an exception's message the grading process reports."""


@dataclass(frozen=True)
class GradeResult:
    """One comparison: ``equal`` is Math-Verify's verdict. Without one, ``equal`` is False and either
    ``timed_out`` (no verdict within the time limit) or ``error`` says why: ``Math-Verify raised ValueError:
    ...``, or ``the grading process was killed by signal 9 (...) during the comparison``."""

    equal: bool
    timed_out: bool = False
    error: str | None = None


class ChildProcess:
    """A child interpreter that prints a ready line, then answers each request line with one reply line.

    A request that gets no reply within its bound (a hang, or a crash on that input) kills the child, starts a
    replacement at once in the background and returns None; ``last_exit`` then says which: the child's exit
    status when it ended by itself (``os._exit(3)``: 3; killed by signal 9: -9), None when it was still running
    at the bound. One request at a time: callers hold ``lock``.

    Args:
        command: the child's command line.
        name: how errors name the child.
        env: the child's environment (None: this process's).
        stderr: where the child's stderr goes (None: this process's).
        error: the exception raised when the child cannot start or dies between requests.
    """

    def __init__(
        self,
        command: list[str],
        name: str,
        env: dict[str, str] | None = None,
        stderr: int | None = subprocess.DEVNULL,
        error: type[ChildUnavailableError] = ChildUnavailableError,
    ) -> None:
        self.command, self.name, self.env, self.stderr, self.error = command, name, env, stderr, error
        self.lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._ready = False
        self._stdout_closed = False
        self.last_exit: int | None = None

    def start(self) -> None:
        """Launch the child without waiting for it to be ready."""
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=self.env,
            close_fds=True,
        )
        self._buffer = b""
        self._ready = False
        self._stdout_closed = False

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first start)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the child, or None when ``deadline`` passes or the child closed stdout."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self._stdout_closed = True
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait_ready(self) -> None:
        """Start the child if needed and wait for its ready line (``STARTUP_TIMEOUT_S`` at most)."""
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        if self._ready:
            return
        line = self._read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        reply = json.loads(line) if line else {}
        if reply.get("ready") is not True:
            self.close()
            reason = reply.get("error") or f"no ready line within {STARTUP_TIMEOUT_S:.0f} s"
            raise self.error(f"{self.name} did not start: {reason}")
        self._ready = True

    def request(self, line: bytes, timeout_s: float) -> bytes | None:
        """Send one request line; its reply line, or None (child killed and replaced) past ``timeout_s``."""
        self.wait_ready()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(line + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            self.close()
            raise self.error(f"{self.name} died") from error
        self.last_exit = None
        reply = self._read_line(time.monotonic() + timeout_s)
        if reply is None:
            # A hang, or a crash on this input: no answer for it. Keep the exit status of a crash (the child
            # closed its stdout: it is ending), then kill and pre-start a replacement so that the next call
            # finds it warm.
            if self._stdout_closed:
                try:
                    self.last_exit = self._proc.wait(EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    self.last_exit = None
            self.close()
            self.start()
        return reply


def describe_exit(status: int) -> str:
    """How a child ended, from its exit status: ``exited with code 3``, or ``was killed by signal 9 (SIGKILL:
    what the kernel's out-of-memory killer sends)``."""
    if status >= 0:
        return f"exited with code {status}"
    number = -status
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    cause = ": what the kernel's out-of-memory killer sends" if number == signal.SIGKILL else ""
    return f"was killed by signal {number} ({name}{cause})"


class GraderProcess(ChildProcess):
    """One child interpreter running Math-Verify (this file, ``python -I``)."""

    def __init__(self) -> None:
        super().__init__(
            [sys.executable, "-I", os.path.abspath(__file__)],
            name="the Math-Verify grading process",
            error=GraderUnavailableError,
        )

    def grade(self, gold: str, pred: str, timeout_s: float) -> GradeResult:
        """Math-Verify equivalence of two answer strings, bounded by ``timeout_s`` (+ a kill grace)."""
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}).encode()
        line = self.request(request, timeout_s * 1.25 + 0.2)
        if line is None:
            if self.last_exit is not None:  # it died on this input: a crash, not a slow comparison
                return GradeResult(
                    False, error=f"the grading process {describe_exit(self.last_exit)} during the comparison"
                )
            return GradeResult(equal=False, timed_out=True)
        reply = json.loads(line)
        error = reply.get("error")
        error = None if error is None else f"Math-Verify raised {error}"
        return GradeResult(equal=bool(reply["equal"]), timed_out=bool(reply["timed_out"]), error=error)

    def extract(self, text: str, timeout_s: float) -> str | None:
        """The answer Math-Verify's LaTeX extraction finds in a whole completion (its "final answer is",
        ``\\boxed{}`` and last-LaTeX rules), or None (none found, or no result within ``timeout_s``)."""
        request = json.dumps({"extract": text, "timeout": timeout_s}).encode()
        line = self.request(request, timeout_s * 1.25 + 0.2)
        return None if line is None else json.loads(line)["answer"]


class GraderPool:
    """``num_workers`` grading processes shared by every thread of this process.

    A caller takes a free process (waiting if all are busy), so concurrent callers' bounds include the
    wait for a free process.
    """

    def __init__(self, num_workers: int = 1) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._free: queue.SimpleQueue[GraderProcess] = queue.SimpleQueue()
        self._all = [GraderProcess() for _ in range(num_workers)]
        for worker in self._all:
            self._free.put(worker)

    def _on_free_worker(self, call: Callable[[GraderProcess], _T]) -> _T:
        worker = self._free.get()
        try:
            with worker.lock:
                return call(worker)
        finally:
            self._free.put(worker)

    def grade(self, gold: str, pred: str, timeout_s: float) -> GradeResult:
        return self._on_free_worker(lambda worker: worker.grade(gold, pred, timeout_s))

    def extract(self, text: str, timeout_s: float) -> str | None:
        """``GraderProcess.extract`` on a free grading process."""
        return self._on_free_worker(lambda worker: worker.extract(text, timeout_s))

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the grading processes (None for one not started yet)."""
        return [worker.pid for worker in self._all]

    def close(self) -> None:
        for worker in self._all:
            worker.close()


_POOL: GraderPool | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> GraderPool:
    """The process-wide pool (one grading process, started on first use, killed at exit).

    A forked child (e.g. a dataloader worker) gets its own pool: sharing the parent's pipes would mix
    the two processes' requests.
    """
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID:
            _POOL, _POOL_PID = GraderPool(num_workers=1), os.getpid()
            atexit.register(_POOL.close)
        return _POOL


# ------------------------------------------------------------------------------------------ the child
# Everything below runs in the grading process only; sympy and math_verify are imported there, never here.


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


def _extract(text: str, timeout: float, config: list) -> str | None:  # pragma: no cover - runs in the child
    """The string Math-Verify extracted from a whole text (``parse`` gives ``[expression, string]``)."""
    from math_verify import parse

    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            found = parse(text, extraction_config=config, parsing_timeout=None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (_Alarm, Exception):
        return None
    return str(found[-1]) if len(found) >= 2 else None


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
        equal, error = False, " ".join(f"{type(failure).__name__}: {failure}".split())[:MAX_ERROR_CHARS]
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
            reply = {"answer": _extract(request["extract"], float(request["timeout"]), config)}
        else:
            reply = _grade(request["gold"], request["pred"], float(request["timeout"]), config)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":  # pragma: no cover
    _child_main()
