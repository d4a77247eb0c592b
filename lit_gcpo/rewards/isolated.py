"""A user's reward function run in its own child process, where a timeout can actually stop it.

A reward function stuck in a CPU loop cannot be stopped in a thread: the thread keeps running and holding
the interpreter, and training steps went from ~0.8 s to 88-161 s. ``ProcessReward`` runs the function in a
``lit_gcpo.rewards.sandbox.ChildProcess`` (the mechanism of the math grader): a call without a reply within
the timeout kills the child and starts a replacement, and the call raises ``RewardTimeoutError``; a child that
dies during a call (``os._exit``, a segfault, the out-of-memory killer's SIGKILL) is replaced as well, and the
call raises ``RewardCrashError`` with its exit code or signal, at once rather than at the timeout.

The child is this file run as a script with this process's ``sys.path`` (so it imports what the parent can,
and nothing of lit-gcpo unless the user's module does); it imports the function by its dotted path, prints a
ready line, then answers each request. Requests and replies are pickles (base64, one line each): the columns
and scores are plain Python data from the user's own code, and the child is the user's code too.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import sys
import weakref
from typing import Any


class RewardTimeoutError(TimeoutError):
    """A reward call got no reply in time; its process was killed and restarted."""


class RewardCrashError(RuntimeError):
    """The reward's process died during a call (exit code or signal in the message); a new one was started."""


class RewardCallError(RuntimeError):
    """The reward function raised in its process; the message is the child's ``Type: message``."""


def _encode(obj: Any) -> bytes:
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _decode(line: bytes) -> Any:
    return pickle.loads(base64.b64decode(line))


class ProcessReward:
    """Calls the reward function at ``path`` (``pkg.module:function``) in a killable child process.

    Args:
        path: the dotted path of the function.
        timeout: seconds a call may take before the child is killed (and restarted for the next call).
    """

    def __init__(self, path: str, timeout: float) -> None:
        from lit_gcpo.rewards.sandbox import (
            ChildProcess,  # lazy: the child runs this file as a script, without lit-gcpo
        )

        self.path, self.timeout = path, float(timeout)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        self.child = ChildProcess(
            [sys.executable, os.path.abspath(__file__), path],
            name=f"reward {path!r}",
            env=env,
            stderr=None,  # the user's prints and tracebacks stay visible
        )
        self.child.start()  # imports the user's module while the trainer sets up
        self.__name__ = path
        weakref.finalize(self, self.child.close)  # no orphan process once the reward is gone or at exit

    def wait_ready(self) -> None:
        """Wait until the child has imported the function (not counted in a call's timeout)."""
        with self.child.lock:
            self.child.wait_ready()

    def __call__(self, prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[Any]:
        with self.child.lock:
            reply = self.child.request(_encode((prompts, completions, columns)), self.timeout)
        if reply is None:
            if self.child.last_exit is not None:
                from lit_gcpo.rewards.sandbox import describe_exit  # lazy: the child runs this file without lit-gcpo

                raise RewardCrashError(
                    f"its process {describe_exit(self.child.last_exit)} during the call; a new process was started"
                )
            raise RewardTimeoutError(f"no reply within {self.timeout:g} s; its process was killed and restarted")
        status, value = _decode(reply)
        if status == "error":
            raise RewardCallError(value)
        return value

    def close(self) -> None:
        self.child.close()


# ------------------------------------------------------------------------------------------ the child
def _child_main(path: str) -> None:  # pragma: no cover - runs in the child interpreter
    import importlib
    import threading
    import time
    import traceback

    def _exit_with_parent(parent: int) -> None:
        # A function stuck in a loop never reads stdin again, so it would not see the parent's end: poll.
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()

    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this file's folder is not where the user's modules are
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's prints must not corrupt the protocol on stdout
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except BaseException as error:
        out.write(json.dumps({"error": f"cannot import {path}: {type(error).__name__}: {error}"}).encode() + b"\n")
        out.flush()
        return
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        prompts, completions, columns = _decode(line.strip())
        try:
            reply = _encode(("ok", fn(prompts, completions, **columns)))
        except BaseException as error:  # a user function may raise anything, including SystemExit
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            reply = _encode(("error", detail))
        out.write(reply + b"\n")
        out.flush()


if __name__ == "__main__":  # pragma: no cover
    _child_main(sys.argv[1])
