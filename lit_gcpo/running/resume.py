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
  silently set back, and its class (another optimizer's state cannot be restored into it);
- the data position is stored in batches with the batch size and the number of ranks: a run with other ones
  continues at the same prompt, converted (``convert_data_position``); the group size and the rewards are
  compared and printed like every other setting.

Single-file and sharded checkpoints are compared alike (the sharded ones read by
``lit_gcpo.running.sharded_checkpoint``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lit_gcpo.running.sharded_checkpoint import read_sharded_checkpoint

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


def _configured_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The configured optimizer built over one probe parameter (its param group shows its settings), or None when
    it cannot be built here (the module then reports the problem)."""
    probe = [torch.nn.Parameter(torch.zeros(1))]
    plain = _plain(optimizer)
    try:
        if isinstance(plain, dict) and plain.get("class_path"):
            module, _, name = plain["class_path"].rpartition(".")
            return getattr(importlib.import_module(module), name)(probe, **(plain.get("init_args") or {}))
        return optimizer(probe) if callable(optimizer) else None
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def _optimizer_class_mismatch(optimizer: Any, group: Mapping[str, Any]) -> str | None:
    """Why the configured optimizer cannot take over the checkpoint's optimizer state (``group``: its first param
    group), or None. Restoring another optimizer's state replaced the param groups by the saved ones and the
    first step failed with a bare ``KeyError: 'momentum'``."""
    built = _configured_optimizer(optimizer)
    if built is None:
        return None
    given = set(built.param_groups[0]) - {"params"}
    saved = set(group) - {"params", "initial_lr"}  # initial_lr: added by the LR scheduler
    if given == saved:
        return None
    name = type(built).__module__ + "." + type(built).__qualname__
    return (
        f"model.optimizer: {name}, but the checkpoint's optimizer state is another optimizer's (it has "
        f"{sorted(saved - given)}, {type(built).__name__} has {sorted(given - saved)}); its state cannot be restored "
        "into this optimizer"
    )


DATA_SETTINGS = ("batch_size", "group_size", "rewards", "reward_weights", "dynamic_sampling", "off_policy")
"""``data`` settings stored with the data position (``RolloutDataModule.state_dict``) and compared on resume."""


def convert_data_position(state: Mapping[str, Any], batch_size: int, world_size: int) -> tuple[int, str | None]:
    """``(batches, message)``: the saved data position (``consumed_batches`` global batches of ``batch_size`` prompts
    on each of ``world_size`` ranks) in batches of this run's size, and what changed (None: nothing).

    Global batch ``b`` holds the prompts ``[b W B, (b + 1) W B)`` of the stream, so the position is
    ``consumed x B x W`` prompts; a position that falls inside a new batch moves on to the next whole batch
    (skipping the rest of it, never repeating a prompt)."""
    consumed = int(state["consumed_batches"])
    saved_batch, saved_world = state.get("batch_size"), state.get("world_size")
    if saved_batch is None or saved_world is None or (saved_batch, saved_world) == (batch_size, world_size):
        return consumed, None
    prompts, per_batch = consumed * saved_batch * saved_world, batch_size * world_size
    batches = -(-prompts // per_batch)
    skipped = batches * per_batch - prompts
    message = (
        f"data position converted: the checkpoint consumed {consumed} batches of data.batch_size {saved_batch} x "
        f"{saved_world} rank(s) = {prompts} prompts; this run takes data.batch_size {batch_size} x {world_size} "
        f"rank(s) per batch, so it continues at batch {batches} (prompt {batches * per_batch}"
        + (f", skipping {skipped} prompts to reach a whole batch)" if skipped else ", the next one)")
    )
    return batches, message


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
        mismatch = _optimizer_class_mismatch(model.get("optimizer"), group)
        if mismatch:
            refused.append(mismatch)
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
    for name in DATA_SETTINGS if data is not None else ():
        value = _plain(data.get(name))
        given = value is not None or name == "dynamic_sampling"  # None: not given, or dynamic sampling off
        if name in data_state and given and value != _plain(data_state[name]):
            note = "; the data position is converted to the new batches" if name == "batch_size" else ""
            applied.append(f"data.{name}: {value!r} (the checkpoint has {data_state[name]!r}){note}")
    return refused, applied


def check_resume(path: str, config: Any, training: bool = True) -> str:
    """Compare the settings with the checkpoint at ``path``; returns the lines to print, raises
    ``ResumeMismatchError`` listing every refused difference."""
    if Path(path).is_dir():  # sharded: meta.pt and the optimizers' param groups, read safely
        checkpoint = read_sharded_checkpoint(path)
    else:
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
