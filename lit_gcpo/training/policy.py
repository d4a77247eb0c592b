"""Loading the policy and its tokenizer, optional LoRA, and exporting weights for the rollout engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lit_gcpo.moved import allow_unpickling
from lit_gcpo.running.checkpointing import atomic_directory

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the policy.

    Attributes:
        r: rank of the adapters.
        alpha: scaling numerator (``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt (``all-linear`` for every linear layer).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


allow_unpickling(LoraOptions)  # a LoRA run's checkpoint holds it in its hyper-parameters


def resolve(name_or_path: str) -> str:
    """Map the embedded model's alias to its packaged directory; anything else is returned as is."""
    from lit_gcpo.assets.tiny_model import resolve_model_path

    return resolve_model_path(name_or_path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    lora: LoraOptions | None = None,
    disable_dropout: bool = True,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """The causal LM ``name_or_path`` in ``dtype``, with transformers' ``attn_implementation`` (None: its default,
    sdpa where the model supports it), dropout off when asked, LoRA adapters when given."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), dtype=_DTYPES[dtype], **options)
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for name in ("attention_dropout", "hidden_dropout", "dropout"):
            if hasattr(model.config, name):
                setattr(model.config, name, 0.0)
    model.train()  # from_pretrained returns eval mode; dropout is off already when asked
    if lora is not None:
        try:
            import peft
        except ImportError as err:
            raise ImportError("lora needs peft: pip install 'lit-gcpo[peft]'") from err
        config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    return model


def merged_state_items(policy: torch.nn.Module, uses_lora: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs of the policy's weights; LoRA adapters merged without touching the model.

    For a LoRA layer the merged weight is ``W + scale * B @ A``, computed on the fly. FSDP2 shards (DTensors)
    are gathered to full tensors one at a time, a collective: every rank must iterate in step.
    """
    from lit_gcpo.training.parallel import full_tensor

    if not uses_lora:
        for name, tensor in policy.state_dict().items():
            yield name, full_tensor(tensor.detach())
        return
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight  # [out, in]
                    weight = weight + module.scaling[adapter] * delta.to(weight.dtype)
            merged[f"{module_name}.weight"] = weight
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        yield clean, merged.get(clean, tensor.detach())


def save_policy(
    policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, target: str, uses_lora: bool, write: bool
) -> None:
    """``save_pretrained`` of the policy (LoRA merged, FSDP2 shards gathered) and its tokenizer to ``target``.

    Every rank must call it (gathering is a collective); only the one with ``write`` writes, into a temporary
    directory that then replaces ``target``: a kill during the export leaves no empty or partial ``target``.
    """
    state = {name: tensor.contiguous() for name, tensor in merged_state_items(policy, uses_lora)}
    if not write:
        return
    model = policy.get_base_model() if uses_lora else policy
    with atomic_directory(target) as directory:
        model.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
        if type(model).__name__ != architecture_name(model):  # save_pretrained recorded the FSDP class name
            config = type(model.config).from_pretrained(directory)
            config.architectures = [architecture_name(model)]
            config.save_pretrained(directory)


def architecture_name(model: torch.nn.Module) -> str:
    """The transformers class name of ``model`` (``fully_shard`` renames the class ``FSDP<Name>``), as a
    checkpoint's ``config.architectures`` must hold it for transformers and vLLM to load it."""
    return type(model).__name__.removeprefix("FSDP")
