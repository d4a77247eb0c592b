"""The rollout engines' constructor options as one typed setting (``data.engine_options``), so that ``--help``
lists each with its type and meaning. Each option belongs to one engine (``hf`` or ``vllm``, its field's
``metadata["engine"]``); unset options (None) take the engine's own default, and setting another engine's
option is an error. ``tests/test_engine_options.py`` keeps the fields equal to the engines' constructors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _option(engine: str) -> Any:
    return field(default=None, metadata={"engine": engine})


@dataclass
class EngineOptions:
    """Options of the rollout engine (``data.engine``); None: the engine's default.

    Attributes:
        max_batch_size: (hf) at most this many sequences per forward pass (bounds memory); 0 = all at once.
        decode_threads: (hf) torch threads of the sampling loop on a CPU; 0 = one thread for a small policy
            (fewer than ``lit_gcpo.engines.hf.SMALL_POLICY_PARAMETERS``), torch's own setting otherwise. Set from the
            main thread only (the count is the process's): refused with ``data.off_policy``, whose worker samples on
            the trainer's threads.
        model_path: (vllm) a local Hugging Face directory with the policy's architecture and initial weights; None
            = the policy saved to a temporary directory.
        dtype: (vllm) vLLM's compute dtype (``float32``, ``bfloat16``, ``float16``, ``auto``; default ``auto``).
        gpu_memory_utilization: (vllm) fraction of GPU memory vLLM may take (weights + KV cache; default 0.5).
        tensor_parallel_size: (vllm) vLLM's tensor parallelism; only 1 works with the in-process engine.
        enable_sleep_mode: (vllm) free the GPU weights and KV cache while the trainer steps (GPU only).
        max_model_len: (vllm) longest prompt + completion in tokens; None = the model's context length.
        enforce_eager: (vllm) skip torch.compile / CUDA graphs (shorter start-up, slower generation).
        seed: (vllm) seed of vLLM's start-up and of the engine's own sampling RNG stream (default 0).
        sync_every: (vllm) load the weights on every k-th sync only (default 1: every optimizer step).
        enable_prefix_caching: (vllm) reuse the KV of shared prompt prefixes (default true).
    """

    max_batch_size: int | None = _option("hf")
    decode_threads: int | None = _option("hf")
    model_path: str | None = _option("vllm")
    dtype: str | None = _option("vllm")
    gpu_memory_utilization: float | None = _option("vllm")
    tensor_parallel_size: int | None = _option("vllm")
    enable_sleep_mode: bool | None = _option("vllm")
    max_model_len: int | None = _option("vllm")
    enforce_eager: bool | None = _option("vllm")
    seed: int | None = _option("vllm")
    sync_every: int | None = _option("vllm")
    enable_prefix_caching: bool | None = _option("vllm")

    @staticmethod
    def names(engine: str) -> list[str]:
        """The options of ``engine``."""
        return [option.name for option in fields(EngineOptions) if option.metadata["engine"] == engine]

    def for_engine(self, engine: str) -> dict[str, Any]:
        """The options set (not None), as keyword arguments of ``engine``'s constructor; an option of another
        engine is an error that names it."""
        given = {option.name: getattr(self, option.name) for option in fields(self)}
        given = {name: value for name, value in given.items() if value is not None}
        foreign = sorted(set(given) - set(self.names(engine)))
        if foreign:
            raise ValueError(
                f"data.engine_options {', '.join(foreign)}: not options of the {engine!r} engine "
                f"(its options: {', '.join(self.names(engine))})"
            )
        return given
