"""Run by test_vllm_guards.py in a process of its own (the session's engine would block every start here): engines
started one after the other in one process, each after the previous one is gone, and what each step left behind.

Steps: a start that fails after vLLM set its parallel groups up (a planted error where the KV cache is sized); engine
A, closed while its ``LLM`` is still referenced elsewhere (collected only once B runs); engine B, dropped without
close() while its ``LLM`` is still referenced (a third engine is refused), then the reference dropped too; engine C.
Writes the record as JSON to the path given.
"""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.vllm import VLLMEngine
from lit_gcpo.engines.vllm_guards import parallel_state_up

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def _refusal(start) -> str | None:
    """The error ``start()`` raised, as ``Type: message``; None if it returned."""
    try:
        start()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


if __name__ == "__main__":
    config = build_tiny_config(hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=512)
    config.initializer_range = 0.2  # as the session policy: no near-ties in greedy decoding
    policy = build_tiny_model(config, seed=0).float()
    tokenizer = build_char_tokenizer()

    def start() -> VLLMEngine:
        return VLLMEngine(policy, tokenizer, dtype="float32", max_model_len=256, seed=0)

    record: dict = {}
    from vllm.v1.engine.core import EngineCore

    sized = EngineCore._initialize_kv_caches

    def planted(self, vllm_config):
        record["groups_up_when_it_failed"] = parallel_state_up()
        raise RuntimeError("planted: no room for the KV cache")

    EngineCore._initialize_kv_caches = planted
    record["failed_start"] = _refusal(start)
    EngineCore._initialize_kv_caches = sized
    record["groups_up_after_failed_start"] = parallel_state_up()

    a = start()
    record["a"] = a.generate(PROMPTS, 1, GREEDY).completion_ids
    a_llm = a.llm  # referenced elsewhere (as a benchmark might): dropping the engine's own reference frees nothing
    a.close()
    record["groups_up_after_close"] = parallel_state_up()
    record["a_after_close"] = _refusal(lambda: a.generate(PROMPTS, 1, GREEDY))

    b = start()
    record["b"] = b.generate(PROMPTS, 1, GREEDY).completion_ids
    del a, a_llm
    gc.collect()  # A's vLLM was shut down at close: collecting it now must not take B's parallel groups
    record["b_after_a_collected"] = b.generate(PROMPTS, 1, GREEDY).completion_ids
    held = b.llm
    del b
    record["refused_while_llm_held"] = _refusal(start)
    del held

    c = start()  # B's LLM is garbage now: the claim collects it, and B's shutdown runs before C starts
    record["c"] = c.generate(PROMPTS, 1, GREEDY).completion_ids
    c.close()
    record["torch_threads"] = torch.get_num_threads()
    with open(sys.argv[1], "w") as out:
        json.dump(record, out)
