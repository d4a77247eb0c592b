"""Module paths of earlier versions, still importable: old checkpoints and saved configs keep loading.

Issue 24 grouped the flat package by concern (``lit_gcpo.module`` became ``lit_gcpo.training.module``, and so on:
``MOVED``). What names a module by its path outlives such a move: a checkpoint pickles the classes of its
hyper-parameters by module path (a LoRA run's ``lit_gcpo.policy.LoraOptions``), a saved ``config.yaml`` names
class paths (``lit_gcpo.parallel.FSDP2Strategy``), a script runs ``python -m lit_gcpo.cli``. Importing an old
path gives a module that forwards every attribute to the new one (the same classes and functions, so an object
unpickled through it is an instance of the current class), with one ``MovedModuleWarning`` naming the new path.

``allow_unpickling`` makes a class a checkpoint holds loadable by ``torch.load(weights_only=True)`` (what
``--ckpt_path`` and Lightning use) under its current and its old paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence

# old module path -> its current path (from `git log --diff-filter=R` of the moves)
MOVED: dict[str, str] = {
    **{
        f"lit_gcpo.{name}": f"lit_gcpo.algorithms.{name}"
        for name in (
            "advantages",
            "clustering",
            "diagnostics",
            "embeddings",
            "faithfulness",
            "label_free",
            "logprobs",
            "losses",
            "registry",
            "token_distribution",
            "token_selection",
            "uncertainty",
            "weighting",
        )
    },
    **{f"lit_gcpo.{name}": f"lit_gcpo.data.{name}" for name in ("batch", "contracts")},
    **{
        f"lit_gcpo.{name}": f"lit_gcpo.running.{name}"
        for name in (
            "checkpointing",
            "cli",
            "last_checkpoint",
            "prediction",
            "progress",
            "resume",
            "run_dir",
            "sharded_checkpoint",
        )
    },
    **{
        f"lit_gcpo.{name}": f"lit_gcpo.training.{name}"
        for name in ("module", "optimizer_step", "parallel", "policy", "reference", "scoring", "step_metrics")
    },
    "lit_gcpo.answers": "lit_gcpo.rewards.answers",
    "lit_gcpo.sandbox": "lit_gcpo.rewards.sandbox",
    "lit_gcpo.comparison": "lit_gcpo.evaluation.comparison",
    "lit_gcpo.evaluation.benchmarks": "lit_gcpo.data.benchmarks",
    "lit_gcpo.tiny_model": "lit_gcpo.assets.tiny_model",
}


class MovedModuleWarning(DeprecationWarning):
    """An old module path was imported; the message names the new one."""


class _Forwarding(importlib.abc.Loader):
    """Makes the old module a forwarder to ``target``; ``get_code`` lets ``python -m <old path>`` run it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # a plain module

    def exec_module(self, module: types.ModuleType) -> None:
        self._warn(module.__name__)
        target = importlib.import_module(self.target)
        module.__doc__ = f"Moved to {self.target}: every attribute is read there."
        module.__getattr__ = lambda name: getattr(target, name)  # PEP 562: what the module itself lacks
        module.__dir__ = lambda: dir(target)

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The new module's code, for ``runpy`` (``python -m <old path>`` runs it as ``__main__``)."""
        self._warn(fullname)
        spec = importlib.util.find_spec(self.target)
        loader = spec.loader if spec is not None else None
        return loader.get_code(self.target) if isinstance(loader, importlib.abc.InspectLoader) else None

    def _warn(self, old: str) -> None:
        warnings.warn(
            f"{old} is now {self.target}: import it from there (the old path will be removed)",
            MovedModuleWarning,
            stacklevel=3,
        )


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of ``MOVED`` under their old paths (asked only after the real files were not found)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        # the new file as origin: ``python -m <old path>`` sets sys.argv[0] from it (the module gets no __file__)
        origin = getattr(importlib.util.find_spec(new), "origin", None)
        return importlib.util.spec_from_loader(fullname, _Forwarding(new), origin=origin)


def install() -> None:
    """Put ``MovedModuleFinder`` on ``sys.meta_path`` (once), and show ``MovedModuleWarning`` once per place unless
    warnings were configured on the command line (a DeprecationWarning is hidden outside ``__main__``; this one is
    for users of old checkpoints and configs)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
        if not sys.warnoptions:
            warnings.filterwarnings("default", category=MovedModuleWarning)


def allow_unpickling(cls: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild ``cls`` named by its current path or an old one (``MOVED``):
    for plain classes that checkpoints hold in their hyper-parameters (a LoRA run's ``LoraOptions``)."""
    import torch.serialization

    old_modules = [old for old, new in MOVED.items() if new == cls.__module__]
    torch.serialization.add_safe_globals([cls, *((cls, f"{old}.{cls.__qualname__}") for old in old_modules)])
