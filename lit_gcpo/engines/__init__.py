"""Rollout engines by name, imported lazily (``vllm`` is only needed when it is chosen)."""

from __future__ import annotations

import importlib
from typing import Any

from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig

ENGINES: dict[str, str] = {
    "hf": "lit_gcpo.engines.hf:HFEngine",
    "vllm": "lit_gcpo.engines.vllm:VLLMEngine",
}


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine class registered as ``name``; an unknown name lists the valid ones."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid engines: {sorted(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"rollout engine {name!r} needs a package that is not installed ({err}); "
            f"for vllm: pip install 'lit-gcpo[vllm]' on a GPU machine, or scripts/setup_vllm_cpu.sh on a CPU"
        ) from err
    return getattr(module, class_name)


def build_engine(name: str, policy: Any, tokenizer: Any, **options: Any) -> RolloutEngine:
    """Create the engine ``name`` for ``policy`` (a transformers model) with engine-specific options."""
    return engine_class(name)(policy, tokenizer, **options)


__all__ = ["ENGINES", "Generation", "RolloutEngine", "SamplingConfig", "build_engine", "engine_class"]
