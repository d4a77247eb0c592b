"""Killable child processes (``ChildProcess``), and Math-Verify grading in one: a time bound that works
from any thread. User reward functions run in the same kind of child (``lit_gcpo.rewards.isolated``).

Math-Verify bounds ``parse``/``verify`` with ``signal.alarm``, which only works in the main thread of
the main interpreter (Lightning and dataloader threads get a ``ValueError``) and cannot interrupt a
computation that sits in C code: ``verify`` on ``9^{9^{9^{9}}}`` keeps one core busy far past any
alarm. So the grading runs in a child interpreter, ``python -I`` running ``lit_gcpo.rewards.grading_process``:

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
* the child's address space is limited (``grading_process.CHILD_MEMORY_LIMIT_BYTES``) so a runaway expansion raises
  ``MemoryError`` instead of eating the machine's memory;
* besides comparisons, the child answers extraction requests: the answer Math-Verify's LaTeX extraction
  finds in a whole completion (``GraderProcess.extract``, the ``math_verify`` fallback of
  ``lit_gcpo.rewards.answers.read_unboxed``), under the same bounds and reported alike: an extraction
  without a result says whether it timed out, raised or crashed (``ExtractResult``), never passes for "no answer".

Numbers far below 1: Math-Verify compares two numbers after rounding them to 6 decimals, so
``2.88 \\times 10^{-19}`` "equals" ``1.325 \\times 10^{-27}`` and ``-5 \\times 10^{-19}``. When both sides parse
to real numbers, a Math-Verify "equal" must also pass a relative test, ``|a - b| <= grading_process.RELATIVE_TOLERANCE *
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

from lit_gcpo.rewards import grading_process

_T = TypeVar("_T")

EXIT_WAIT_S = 1.0
"""Seconds to wait, once a child closed its stdout mid-request, for its exit status (it is dying)."""

STARTUP_TIMEOUT_S = 60.0
"""Seconds a fresh child may take to import Math-Verify (a loaded 2-core machine needs ~1-3 s)."""


class ChildUnavailableError(RuntimeError):
    """A child process could not be started or died for a reason other than a timeout."""


class GraderUnavailableError(ChildUnavailableError):
    """The grading process could not be started or died for a reason other than a timeout."""


@dataclass(frozen=True)
class GradeResult:
    """One comparison: ``equal`` is Math-Verify's verdict. Without one, ``equal`` is False and either
    ``timed_out`` (no verdict within the time limit) or ``error`` says why: ``Math-Verify raised ValueError:
    ...``, or ``the grading process was killed by signal 9 (...) during the comparison``."""

    equal: bool
    timed_out: bool = False
    error: str | None = None


@dataclass(frozen=True)
class ExtractResult:
    """One extraction: ``answer`` is what Math-Verify's extraction found (None: nothing). Without a result,
    ``answer`` is None and either ``timed_out`` or ``error`` says why, as for :class:`GradeResult`."""

    answer: str | None
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
            [sys.executable, "-I", os.path.abspath(grading_process.__file__)],
            name="the Math-Verify grading process",
            error=GraderUnavailableError,
        )

    def grade(self, gold: str, pred: str, timeout_s: float) -> GradeResult:
        """Math-Verify equivalence of two answer strings, bounded by ``timeout_s`` (+ a kill grace)."""
        request = json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}).encode()
        reply = self._reply(request, timeout_s, "comparison")
        error = reply.get("error")
        return GradeResult(equal=bool(reply.get("equal")), timed_out=bool(reply["timed_out"]), error=error)

    def extract(self, text: str, timeout_s: float) -> ExtractResult:
        """The answer Math-Verify's LaTeX extraction finds in a whole completion (its "final answer is",
        ``\\boxed{}`` and last-LaTeX rules), or None when it finds none; bounded by ``timeout_s`` (+ a kill grace)
        and, without a result, why (``ExtractResult``)."""
        request = json.dumps({"extract": text, "timeout": timeout_s}).encode()
        reply = self._reply(request, timeout_s, "extraction")
        return ExtractResult(reply.get("answer"), timed_out=bool(reply["timed_out"]), error=reply.get("error"))

    def _reply(self, request: bytes, timeout_s: float, what: str) -> dict[str, Any]:
        """The child's reply to ``request``, its ``error`` (an exception in Math-Verify) prefixed as reported; for
        no reply within ``timeout_s * 1.25 + 0.2`` s a crash (the child's exit, during the ``what``) or a timeout."""
        line = self.request(request, timeout_s * 1.25 + 0.2)
        if line is None:
            if self.last_exit is None:
                return {"timed_out": True}
            # it died on this input: a crash, not a slow request
            return {
                "timed_out": False,
                "error": f"the grading process {describe_exit(self.last_exit)} during the {what}",
            }
        reply = json.loads(line)
        if reply.get("error") is not None:
            reply["error"] = f"Math-Verify raised {reply['error']}"
        return reply


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

    def extract(self, text: str, timeout_s: float) -> ExtractResult:
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
