"""VLLMEngine refuses what hung or broke before: a call overlapping another one's from a second thread, and a second
engine in the process while one is open; calls one after the other from different threads, and a new engine after
``close()``, work (the last in a process of its own: ``engine_lifecycle_run.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lit_gcpo.engines.base import SamplingConfig

pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=10)
SEEDS = [11, 12]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
# Each call of the engine, as the other thread makes it while one call holds the engine.
CALLS = {
    "generate": lambda engine, state: engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS),
    "sync_weights": lambda engine, state: engine.sync_weights(state, force=True),
    "sleep": lambda engine, state: engine.sleep(),
    "wake_up": lambda engine, state: engine.wake_up(),
    "close": lambda engine, state: engine.close(),
}
VLLM_METHOD = {"generate": "generate", "sync_weights": "collective_rpc"}  # where each held call waits inside vLLM


@contextlib.contextmanager
def _held_inside_vllm(engine, method: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """``engine.llm.<method>`` waits for ``release`` after setting ``entered``: the engine call that reached it holds
    the engine meanwhile."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(engine.llm, method)

    def waiting(*args, **kwargs):
        entered.set()
        assert release.wait(120), "the test never released the held call"
        return original(*args, **kwargs)

    setattr(engine.llm, method, waiting)
    try:
        yield entered, release
    finally:
        release.set()
        delattr(engine.llm, method)  # back to the class's method


def _in_thread(name: str, call) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(call()), name=name, daemon=True)
    thread.start()
    return thread, results


@pytest.mark.parametrize("held", ["generate", "sync_weights"])
def test_a_call_overlapping_another_raises_naming_it_and_its_thread(engine, policy, held):
    """While the ``held`` call of thread 'holder' waits inside vLLM, every engine call from this thread raises at
    once, naming itself, the held call and its thread; none of them touched the engine (a refused sync read no
    weight, the refused close left the engine open), and the held call completes with the result it has alone."""
    state = list(policy.state_dict().items())
    reference = engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS)
    consumed: list[str] = []

    def read_weights():  # the weights of a sync, recording that they were read
        for name, tensor in state:
            consumed.append(name)
            yield name, tensor

    syncs_before = engine.state_dict()["sync_calls"]
    with _held_inside_vllm(engine, VLLM_METHOD[held]) as (entered, release):
        holder, results = _in_thread("holder", lambda: CALLS[held](engine, state))
        assert entered.wait(120)
        for name, call in CALLS.items():
            weights = read_weights() if name == "sync_weights" else state
            expected = rf"VLLMEngine\.{name} called from thread 'MainThread' while {held} in thread 'holder' is in"
            with pytest.raises(RuntimeError, match=expected):
                call(engine, weights)
        assert consumed == []
        release.set()
        holder.join(120)
    assert not holder.is_alive() and len(results) == 1
    assert engine.state_dict()["sync_calls"] == syncs_before + (held == "sync_weights")
    again = engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS)  # the engine is open and holds the same weights
    assert again.completion_ids == reference.completion_ids
    if held == "generate":
        assert results[0].completion_ids == reference.completion_ids
        assert results[0].logprobs == reference.logprobs


def test_calls_one_after_the_other_from_two_threads_work(engine, policy, restore_policy):
    """The off-policy schedule: a worker thread samples, this thread syncs new weights, another worker thread samples
    with them. Each call gives what the same call gives in this thread: the first sampling equals one made here
    before, the second equals one made here after (same seeds), and differs from the first (the sync landed)."""
    before = engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS)
    first_worker, first = _in_thread("worker-1", lambda: engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS))
    first_worker.join(120)
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.mul_(4.0)  # a large change: other tokens
    engine.sync_weights(policy.state_dict().items())
    second_worker, second = _in_thread("worker-2", lambda: engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS))
    second_worker.join(120)
    after = engine.generate(PROMPTS, 2, SAMPLED, seeds=SEEDS)
    assert first[0].completion_ids == before.completion_ids and first[0].logprobs == before.logprobs
    assert second[0].completion_ids == after.completion_ids and second[0].logprobs == after.logprobs
    assert second[0].completion_ids != first[0].completion_ids


def test_a_second_engine_is_refused_while_one_is_open(engine, policy, tokenizer, monkeypatch):
    """Refused before anything is written or started, naming the open engine and the way out; the open engine keeps
    generating what it did (a second engine once closed took vLLM's parallel groups from the first)."""
    from lit_gcpo.engines.vllm import VLLMEngine

    before = engine.generate(PROMPTS, 1, GREEDY)
    written: list[str] = []
    monkeypatch.setattr(VLLMEngine, "_write_checkpoint", lambda self, *args: written.append("checkpoint"))
    monkeypatch.setattr(VLLMEngine, "_start", lambda self, *args, **kwargs: written.append("start"))
    expected = (
        r"cannot start a second VLLMEngine in this process: a VLLMEngine is open \(created in thread 'MainThread', "
        rf"model_path {engine.model_path}\).*close\(\) it first"
    )
    with pytest.raises(RuntimeError, match=expected):
        VLLMEngine(policy, tokenizer, dtype="float32", max_model_len=512)
    assert written == []
    assert engine.generate(PROMPTS, 1, GREEDY).completion_ids == before.completion_ids


def test_engines_one_after_the_other_in_a_process(tmp_path):
    """In a fresh process (engine_lifecycle_run.py): a start that failed after vLLM made its parallel groups leaves
        none (the next start works); close() takes them down at once, even with the engine's LLM referenced elsewhere,
    and a new engine starts and gives the closed one's greedy completions; collecting the closed engine's LLM later
    leaves the new one working (a close that only dropped its reference left vLLM running: its late teardown took
    the new engine's groups); an engine dropped without close() while its LLM is still referenced blocks a start
    (refused, saying so), and once that reference goes the next start works."""
    out = tmp_path / "record.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(HERE / "engine_lifecycle_run.py"), str(out)], check=True, env=env, timeout=900)
    record = json.loads(out.read_text())
    assert "planted: no room for the KV cache" in record["failed_start"]
    assert record["groups_up_when_it_failed"] and not record["groups_up_after_failed_start"]
    assert len(record["a"]) == 2 and all(len(ids) > 1 for ids in record["a"])
    assert not record["groups_up_after_close"]
    assert record["a_after_close"] == "RuntimeError: VLLMEngine cannot be used: the engine was closed"
    assert record["b"] == record["b_after_a_collected"] == record["c"] == record["a"]
    assert record["refused_while_llm_held"].startswith(
        "RuntimeError: cannot start a second VLLMEngine in this process: vLLM's parallel state from another engine"
    )
