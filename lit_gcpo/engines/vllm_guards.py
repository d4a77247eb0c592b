"""What vLLM in the trainer's process needs guarding against: misuses that hung or broke far from their cause,
refused where they happen, and vLLM's reseeding of the process's RNGs.

- **One engine, two threads at once.** ``LLM.generate`` of the in-process engine steps vLLM's engine core in the
  calling thread until its own requests are done; two threads stepping one core take each other's outputs. Measured
  on vLLM 0.32's CPU build (two threads, one ``generate`` each): one thread died in the model runner (``KeyError``
  on a request id the other had scheduled), the other still waited 60 s later. :class:`ExclusiveCalls` lets one
  engine call run at a time and makes an overlapping call raise at once, naming the call in progress and its thread.
  Calls from different threads one after the other stay fine: the one-step-off-policy worker samples in its thread
  and the trainer syncs in its own once it has taken the batch (``lit_gcpo.data.off_policy_vllm``).
- **Two engines in one process.** vLLM keeps its parallel groups (and, in a single process, the ``torch.distributed``
  group it created) in module globals that every in-process engine shares, and an engine's shutdown destroys them.
  Measured: a second engine reused the first's groups; once it was closed, the first failed at its next
  ``generate`` ("pipeline model parallel group is not initialized"). Chosen: one open engine per process.
  :func:`claim_process` refuses a second, saying which engine is open and that ``close()`` frees the place;
  ``VLLMEngine.close`` shuts vLLM down at once, so a new engine can start right after. Why not count references and
  let the last close tear down: it would mean replacing vLLM's finalizer on its engine-core client and running its
  shutdown without the teardown (private parts of vLLM that change between releases), for a case nothing here
  needs (one engine per data module, one data module per run) and which costs a second copy of the weights and KV
  cache. The check also sees vLLM's parallel state left by an engine VLLMEngine does not know of: a bare
  ``vllm.LLM``, or the ``LLM`` of a dropped VLLMEngine that something still references.
- **The process's RNGs.** vLLM reseeds them when an engine starts and samples from the global torch generator:
  :func:`preserved_global_rng` gives the trainer its states back (``VLLMEngine``'s docstring says where).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

Method = TypeVar("Method", bound=Callable[..., Any])


class ExclusiveCalls:
    """One call at a time on one engine, from whichever thread; an overlapping call raises instead of waiting.

    A non-blocking lock: waiting would serialise the calls, but a second caller means two threads drive one engine,
    a schedule error that should surface where it happens (the in-flight batch of the off-policy worker, say, was
    not taken before a sync). The lock is not tied to a thread: a call started in one thread may be followed by one
    from another as soon as it returned.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._holder: tuple[str, str] | None = None  # (call, thread name) of the call in progress

    @contextlib.contextmanager
    def __call__(self, call: str) -> Iterator[None]:
        caller = threading.current_thread().name
        if not self._lock.acquire(blocking=False):
            holder = self._holder  # None if it returned meanwhile: the caller still overlapped it
            running = f"{holder[0]} in thread {holder[1]!r}" if holder is not None else "another call"
            raise RuntimeError(
                f"{self._owner}.{call} called from thread {caller!r} while {running} is in progress: one engine "
                "serves one call at a time (two threads driving vLLM's in-process engine at once hang it); let "
                "that call return first"
            )
        self._holder = (call, caller)
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()


def exclusive(method: Method) -> Method:
    """Run an engine method under the engine's ``_calls`` (:class:`ExclusiveCalls`), named after the method."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._calls(method.__name__):
            return method(self, *args, **kwargs)

    return guarded  # type: ignore[return-value]


_PROCESS_LOCK = threading.Lock()
_open: tuple[weakref.ref[Any], str] | None = None  # the process's open engine and the thread that created it


def claim_process(engine: Any) -> None:
    """Make ``engine`` the process's one open vLLM engine, or raise ``RuntimeError`` saying which one is open."""
    global _open
    with _PROCESS_LOCK:
        blocker = _open_engine()
        if blocker is not None:
            gc.collect()  # an engine dropped without close() may wait in a reference cycle; its teardown runs now
            blocker = _open_engine()
        if blocker is not None:
            raise RuntimeError(
                f"cannot start a second VLLMEngine in this process: {blocker}. vLLM's in-process engines share their "
                "parallel state, and closing either would break the other: reuse the open engine, or close() it "
                "first (a RolloutDataModule's is data.collector.engine)"
            )
        _open = (weakref.ref(engine), threading.current_thread().name)


def release_process(engine: Any) -> None:
    """Give up ``engine``'s claim once its vLLM engine was shut down (or failed to start); another may start then.

    The holder of the claim is the one engine that can have set vLLM's parallel state up: what a start that failed
    half-way left of it (vLLM made its groups, then e.g. found no room for the KV cache) goes too, or the next claim
    would be refused for it.
    """
    global _open
    with _PROCESS_LOCK:
        if _open is None or _open[0]() is not engine:
            return
        _open = None
        if parallel_state_up():
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()


def _open_engine() -> str | None:
    """What holds the process's vLLM state: an open VLLMEngine, vLLM's own parallel state, or nothing (None)."""
    if _open is not None:
        engine, thread = _open[0](), _open[1]
        if engine is not None:
            where = getattr(engine, "model_path", None) or "still starting"
            return f"a VLLMEngine is open (created in thread {thread!r}, model_path {where})"
    if parallel_state_up():
        return (
            "vLLM's parallel state from another engine is still up (a vllm.LLM made outside VLLMEngine, or the LLM "
            "of a dropped VLLMEngine that is still referenced)"
        )
    return None


def parallel_state_up() -> bool:
    """Whether vLLM's process-wide model-parallel groups exist (an engine set them up and has not shut down)."""
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    return model_parallel_is_initialized()


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore the torch (CPU, CUDA), numpy and ``random`` global RNG states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
