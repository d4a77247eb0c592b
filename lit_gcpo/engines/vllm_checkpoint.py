"""The checkpoint the ``vllm`` engine starts from: the policy written where vLLM loads it (LoRA merged, Hugging
Face names, its config and tokenizer beside it), and the tensor spec of a checkpoint's safetensors files (read from
the headers only), against which every sync is checked (``validated_weights``, called by ``sync_weights``); and the
repacking of a tied output head after a reload on the CPU (``repack_tied_lm_head``)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import safe_open

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightSyncError(RuntimeError):
    """The weights given to ``sync_weights`` do not fit the engine, or loading them failed."""


def checkpoint_spec(model_path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the safetensors files of ``model_path`` (headers only)."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model_path {model_path!r} has no *.safetensors file")
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = handle.get_slice(name)
                spec[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()])
    return spec


def policy_state_names(policy: torch.nn.Module) -> set[str]:
    """The names of the merged weights the trainer sends on sync (``merged_state_items``): the checkpoint's, and
    tied aliases such as ``lm_head.weight`` that it omits."""
    from lit_gcpo.training.policy import merged_state_items

    return {name for name, _ in merged_state_items(policy, uses_lora=is_peft(policy))}


def is_peft(policy: torch.nn.Module) -> bool:
    """Whether ``policy`` is a peft model (its adapters are merged into what the engine loads)."""
    return hasattr(policy, "get_base_model") and hasattr(policy, "peft_config")


def write_policy(policy: torch.nn.Module, tokenizer: Any, directory: str) -> None:
    """Write the policy (LoRA merged, Hugging Face names), its config and tokenizer where vLLM can load them.

    Every rank writes its own copy (transformers' ``save_pretrained`` writes on rank 0 only once a process group
    exists). A tensor sharing storage with one written before (a tied output head) is left out, as
    ``save_pretrained`` does; the engine's spec then drops it on sync.
    """
    from safetensors.torch import save_file

    from lit_gcpo.training.policy import architecture_name, merged_state_items

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in merged_state_items(policy, uses_lora=is_peft(policy)):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        state[name] = tensor.detach().to("cpu").contiguous()
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    base = policy.get_base_model() if is_peft(policy) else policy
    config = base.config
    config.architectures = [architecture_name(base)]
    config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def validated_weights(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    dropped: set[str],
    model_path: str,
) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs to load, each checked against the checkpoint's ``expected`` spec (name, shape,
    float or not) and all of it present, before anything is loaded; names in ``dropped`` (tied aliases the
    checkpoint omits) left out. Raises ``WeightSyncError`` naming the offending parameter."""
    pairs: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    for name, tensor in named_parameters:
        if name in dropped:
            continue
        if name not in expected:
            raise WeightSyncError(
                f"sync_weights: parameter {name!r} is not in the engine's checkpoint "
                f"({len(expected)} tensors in {model_path}); pass merged Hugging Face names"
            )
        if name in seen:
            raise WeightSyncError(f"sync_weights: parameter {name!r} was given twice")
        shape, dtype = expected[name]
        if tuple(tensor.shape) != shape:
            raise WeightSyncError(
                f"sync_weights: parameter {name!r} has shape {tuple(tensor.shape)}, the engine expects {shape}"
            )
        if tensor.dtype.is_floating_point != dtype.is_floating_point:
            raise WeightSyncError(
                f"sync_weights: parameter {name!r} has dtype {tensor.dtype}, the engine expects {dtype}"
            )
        seen.add(name)
        pairs.append((name, tensor))
    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightSyncError(
            f"sync_weights: {len(missing)} parameter(s) missing, e.g. {missing[:3]}; a partial reload "
            f"would leave the engine without weights"
        )
    return pairs


def repack_tied_lm_head(worker: Any) -> None:
    """Re-derive the CPU kernel of a tied output head from the freshly reloaded embedding (runs in the worker).

    On the CPU vLLM packs the head's weight into a separate GEMM kernel. ``reload_weights`` refills the
    shared embedding, but the head itself receives no checkpoint tensor (it is tied), so vLLM keeps its
    old packed copy: measured log-probs then lag the policy by up to 0.07 after one step. Repeating the
    head's post-load processing packs the new values.
    """
    model = worker.model_runner.get_model()
    head = model.lm_head
    pointer = head.weight.data_ptr()
    shared = any(
        module is not head
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.data_ptr() == pointer
        for module in model.modules()
    )
    if not shared:
        raise WeightSyncError("the tied lm_head no longer shares the embedding's storage after reload_weights")
    head.quant_method.process_weights_after_loading(head)
