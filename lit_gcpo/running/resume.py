"""What a run resumed with ``--ckpt_path`` takes from the checkpoint and what from its settings.

Lightning's CLI copies the checkpoint's saved hyper-parameters over the parsed configuration, so
``--model.beta 0.1`` or even ``--model.model OTHER`` given with ``--ckpt_path`` were dropped without a word.
The rule here (project's choice):

- the checkpoint gives the state: weights, optimizer and LR-scheduler state, the step and the data position;
- the configuration (config files and command line) gives every setting, and a setting that differs from
  the checkpoint's is applied and printed;
- except where the checkpoint's state would contradict it, which is refused with the two values: the model's
  identity (``model``, ``tokenizer``, ``dtype``, ``lora``: resuming means continuing the checkpoint's model)
  and the optimizer's hyper-parameters (``lr``, ``betas``, ...), which the restored optimizer state would
  silently set back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

IDENTITY = ("model", "tokenizer", "dtype", "lora")
"""Module settings that define which model the weights belong to."""

_NOT_SETTINGS = ("optimizer", "scheduler", "_instantiator", "_class_path")


class ResumeMismatchError(ValueError):
    """The settings contradict the checkpoint being resumed."""


def _plain(value: Any) -> Any:
    """Namespaces, tuples and dataclass-like values as plain dicts and lists, for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _same(name: str, given: Any, saved: Any) -> bool:
    paths = name in ("model", "tokenizer") and isinstance(given, str) and isinstance(saved, str)
    if paths and os.path.exists(given) and os.path.exists(saved):
        return Path(given).resolve() == Path(saved).resolve()
    return _plain(given) == _plain(saved)


def _optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """``init_args`` of the configured optimizer (empty for the built-in default)."""
    optimizer = _plain(optimizer)
    if isinstance(optimizer, dict):
        return dict(optimizer.get("init_args") or {})
    return {}


def compare_with_checkpoint(
    checkpoint: Mapping[str, Any], config: Any, training: bool = True
) -> tuple[list[str], list[str]]:
    """``(refused, applied)``: one line per setting of ``config`` (the subcommand's namespace) that differs
    from the checkpoint, naming the option and both values. Optimizer settings only matter when ``training``
    (``fit``): evaluating a checkpoint restores no optimizer state."""
    refused, applied = [], []
    saved = dict(checkpoint.get("hyper_parameters") or {})
    model = _plain(config.get("model")) or {}
    for name, value in model.items():
        if name in _NOT_SETTINGS or name not in saved or _same(name, value, saved[name]):
            continue
        line = f"model.{name}: {value!r} (the checkpoint has {saved[name]!r})"
        (refused if name in IDENTITY else applied).append(line)
    groups = [group for state in checkpoint.get("optimizer_states") or [] for group in state.get("param_groups", [])]
    if groups and training:
        group = groups[0]
        for name, value in _optimizer_settings(model.get("optimizer")).items():
            stored = group.get("initial_lr", group.get("lr")) if name == "lr" else group.get(name)
            if stored is not None and _plain(value) != _plain(stored):
                refused.append(
                    f"model.optimizer.init_args.{name}: {value!r} (the checkpoint's optimizer state has {stored!r} "
                    "and would set it back)"
                )
    data_state = checkpoint.get("RolloutDataModule") or {}
    data = config.get("data")
    seed = data.get("seed") if data is not None else None
    if seed is None and not isinstance(config.get("seed_everything"), bool):
        seed = config.get("seed_everything")
    if "seed" in data_state and seed is not None and seed != data_state["seed"]:
        applied.append(f"data.seed: {seed} (the checkpoint has {data_state['seed']}; the prompt order changes)")
    return refused, applied


def check_resume(path: str, config: Any, training: bool = True) -> str:
    """Compare the settings with the checkpoint at ``path``; returns the lines to print, raises
    ``ResumeMismatchError`` listing every refused difference."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    refused, applied = compare_with_checkpoint(checkpoint, config, training)
    if refused:
        raise ResumeMismatchError(
            f"--ckpt_path {path}: the settings contradict the checkpoint (resuming continues its model and "
            "optimizer):\n  " + "\n  ".join(refused) + "\nGive the checkpoint's values (its run's config.yaml has "
            "them), or start a new run from the exported policy (--model.model <run dir>/policy)."
        )
    data_state = checkpoint.get("RolloutDataModule") or {}
    lines = [
        f"resuming from {path}: the checkpoint gives the weights, the optimizer and LR-scheduler state, step "
        f"{checkpoint.get('global_step', '?')} and the data position (batch {data_state.get('consumed_batches', '?')});"
        " every setting comes from the configuration"
    ]
    lines += [f"  differs from the checkpoint, applied: {line}" for line in applied]
    return "\n".join(lines)
