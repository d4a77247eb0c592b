"""``--trainer.strategy.<option>`` on a strategy given by its registered name (``fsdp2``), on the command line or in
a config file.

jsonargparse applies a nested option only to a class (``class_path``, ``init_args``); a strategy given by a name
Lightning's ``StrategyRegistry`` holds is a plain string to it, and it refused the refinement (exit 2, "Expected a dot
import path string: fsdp2"), whether the name came from ``--trainer.strategy fsdp2`` or from ``strategy: fsdp2`` in a
``--config`` file. :func:`strategy_names_as_classes` rewrites the arguments before jsonargparse reads them: where a
nested option refines a registered name, the name is given again as its class path with the registry's own options
(what ``Trainer(strategy=name)`` would build), so that the nested option refines that class. A nested option on a
strategy that has no class to refine (``auto``, unset) is refused, saying how to write it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.strategies import StrategyRegistry

NESTED = "--trainer.strategy."
SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_OPTIONS = ("--config", "-c", "--trainer")


class StrategyOptionError(ValueError):
    """A ``--trainer.strategy.<option>`` given on a strategy that has no class to set it on."""


def strategy_names_as_classes(args: list[str]) -> list[str]:
    """``args`` with each registered strategy name that a ``--trainer.strategy.<option>`` refines given as its class:
    an explicit ``--trainer.strategy NAME`` is replaced by its class path and the registry's options; a name set in a
    config file (``--config``, ``-c``, ``--trainer``) is followed, right before the first nested option that refines
    it, by that class path. Raises :class:`StrategyOptionError` for a nested option on a strategy with no class."""
    if not any(arg.startswith(NESTED) for arg in args):
        return args
    result: list[str] = []
    current: Any = None  # the strategy as set so far: a name, a class spec (dict), or None (Lightning's "auto")
    refinable = False  # whether `current` is a class that a nested option can refine
    subcommand = next((arg for arg in args if arg in SUBCOMMANDS), None)
    index = 0
    while index < len(args):
        arg, value, index = _option(args, index)
        if arg == subcommand:
            subcommand = None  # the configs from here on are the subcommand's own
        if arg == "--trainer.strategy":
            current, refinable = value, value not in StrategyRegistry and "." in str(value)
            if value in StrategyRegistry:
                result += _as_class(value)
                refinable = True
                continue
        elif arg in CONFIG_OPTIONS and value is not None:
            configured = _configured_strategy(value, arg == "--trainer", subcommand)
            if configured is not None:
                current, refinable = configured, isinstance(configured, dict) or "." in str(configured)
        elif arg.startswith(NESTED) and not refinable:
            if current not in StrategyRegistry:
                raise StrategyOptionError(_unrefinable(arg, current))
            result += _as_class(current)
            refinable = True
        result += [arg] if value is None else [arg, value]
    return result


def _option(args: list[str], index: int) -> tuple[str, str | None, int]:
    """The argument at ``index`` as ``(name, value or None, next index)``: ``--name=value`` and ``--name value`` for
    the options read here; any other argument alone."""
    arg = args[index]
    name, equals, value = arg.partition("=")
    if equals and (name == "--trainer.strategy" or name in CONFIG_OPTIONS):
        return name, value, index + 1
    if equals:
        return arg, None, index + 1
    if (arg == "--trainer.strategy" or arg in CONFIG_OPTIONS or arg.startswith(NESTED)) and index + 1 < len(args):
        return arg, args[index + 1], index + 2
    return arg, None, index + 1


def _as_class(name: str) -> list[str]:
    """``--trainer.strategy <class path>`` and the registry's options of the strategy registered as ``name``."""
    entry = StrategyRegistry[name]
    strategy = entry["strategy"]
    result = ["--trainer.strategy", f"{strategy.__module__}.{strategy.__qualname__}"]
    for option, value in entry["init_params"].items():
        result += [f"{NESTED}{option}", value if isinstance(value, str) else json.dumps(value)]
    return result


def _configured_strategy(value: str, trainer_group: bool, subcommand: str | None) -> Any:
    """The ``trainer.strategy`` that the config ``value`` (a file, or YAML text, as jsonargparse reads it) sets, or
    None. ``trainer_group``: a ``--trainer`` config (its keys are the trainer's); ``subcommand``: the config is given
    before this subcommand's name, and holds the subcommand's settings under its name."""
    path = Path(value)
    try:
        text = path.read_text() if path.is_file() else value
        config = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return None  # jsonargparse reports it
    if not isinstance(config, dict):
        return None
    if subcommand is not None and not trainer_group:
        config = config.get(subcommand)
        if not isinstance(config, dict):
            return None
    trainer = config if trainer_group else config.get("trainer")
    return trainer.get("strategy") if isinstance(trainer, dict) else None


def _unrefinable(option: str, strategy: Any) -> str:
    shown = "unset (Lightning's 'auto')" if strategy is None else repr(strategy)
    return (
        f"{option}: trainer.strategy is {shown}, which has no options to set; name the strategy first, e.g. "
        f"--trainer.strategy fsdp2 {option} VALUE, or in a config file: strategy: {{class_path: "
        "lit_gcpo.training.parallel.FSDP2Strategy, init_args: {...}}"
    )
