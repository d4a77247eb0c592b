"""Shared fixtures: tiny models built offline, no hub access."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer character Llama with its tokenizer, saved to a temporary directory."""
    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model

    path = tmp_path_factory.mktemp("tiny-random")
    config = build_tiny_config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config.initializer_range = 0.3  # large enough that greedy completions differ from prompt to prompt
    build_tiny_model(config, seed=0).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")


@pytest.fixture(autouse=True)
def _no_process_group_leaks_out_of_a_test(request):
    """A test that trains in this process with a distributed strategy (fsdp2 or ddp on one device) leaves a process
    group whose store keeps MASTER_PORT bound, and MASTER_PORT in os.environ: the 2-rank fits that later tests start
    as subprocesses inherited that port and failed with EADDRINUSE. Destroy a group the test created and restore
    those variables. Not in the vLLM suite: a colocated engine (a module-scoped fixture there) owns its group and
    destroys it itself when it shuts down."""
    import torch.distributed as dist

    if request.node.get_closest_marker("vllm") is not None:
        yield
        return
    initialized_before = dist.is_available() and dist.is_initialized()
    before = {name: os.environ.get(name) for name in _DISTRIBUTED_ENV}
    yield
    if dist.is_available() and dist.is_initialized() and not initialized_before:
        dist.destroy_process_group()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
