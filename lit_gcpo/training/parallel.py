"""Data-parallel and sharded training: the ``fsdp2`` strategy, sharding a causal LM, gradient sync, and the
strategies and precisions that GRPOModule refuses.

Why FSDP2 through Lightning's ``ModelParallelStrategy`` and not Lightning's ``FSDPStrategy`` (FSDP1):
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each parameter as a DTensor, runs on CPU tensors with
gloo as well as on GPUs with NCCL (Lightning's ``FSDPStrategy`` refuses a CPU accelerator, so nothing of it
could be tested here), keeps parameter names and ``requires_grad`` per parameter (no flat parameters, so
frozen and trained weights mix freely), and is the FSDP that PyTorch develops. ``FSDP2Strategy`` is
``ModelParallelStrategy`` with every rank in the data-parallel dimension (no tensor parallelism) and full,
single-file checkpoints by default; it is registered as ``--trainer.strategy fsdp2``. The module shards in
``configure_model``: each decoder layer is one FSDP unit, the whole model the root.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.strategies.model_parallel import _is_full_checkpoint, _load_checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy, Strategy, StrategyRegistry
from torch.distributed.checkpoint import FileSystemWriter

from lit_gcpo.running.checkpointing import (
    atomic_torch_save,
    fsync_directory,
    new_temporary_directory,
    replace_directory,
)
from lit_gcpo.running.sharded_checkpoint import META_FILE, check_sharded_checkpoint, load_sharded, read_meta

# Trainer precisions the module honours: mixed bf16 (fp32 master weights) or one dtype throughout.
SUPPORTED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "64-true", "64")
# Strategies it honours: one device, DDP (any launcher), FSDP2.
SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp2")


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over all ranks, on GPUs (NCCL) or CPUs (gloo).

    Args:
        save_distributed_checkpoint: True writes one shard per rank (a directory, no full gather: use it for
            7B-scale models); False (default) gathers full weights and optimizer state into one file on rank 0.
        process_group_backend: ``nccl`` / ``gloo``; None picks the device's default.
        timeout: collective timeout.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the model
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Lightning's writer, except that a sharded checkpoint is complete or absent, as a single file is (Lightning
        wrote the shards into the target directory itself: a kill during the write left the previous checkpoint's
        files mixed with the new ones, which ``--ckpt_path last`` then took for complete).

        Every rank writes its shard into a temporary sibling of the target (``.<name>.tmp-<pid of rank 0>``), rank 0
        then ``meta.pt``, the last file, and renames the directory into place (``replace_directory``: the previous
        one stays in place until then). The ranks agree after each stage; when one fails, every rank raises and the
        temporary directory is removed; a kill leaves it for the next fit to remove."""
        if not self._save_distributed_checkpoint or storage_options is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(str(filepath)))
        made: list[Path] = []
        self._on_every_rank(lambda: made.append(new_temporary_directory(target)) if self.is_global_zero else None)
        temporary = Path(self.broadcast(str(made[0]) if made else None))
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        try:
            self._on_every_rank(lambda: dcp.save(state, storage_writer=FileSystemWriter(temporary)))
            self._on_every_rank(lambda: self.is_global_zero and _complete(checkpoint, temporary, target))
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(temporary, ignore_errors=True)
            raise

    def _on_every_rank(self, stage: Callable[[], Any]) -> None:
        """Run ``stage`` here, then agree with the other ranks: if it failed on any, raise on every one (the error
        itself where it happened)."""
        error: Exception | None = None
        try:
            stage()
        except Exception as failure:
            error = failure
        if not self.reduce_boolean_decision(error is None, all=True):
            raise error or SharedWriteError("writing a sharded checkpoint failed on another rank (see its error)")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, except for a single-file checkpoint whose optimizers saved no state (plain SGD, or
        no step taken yet): Lightning's loader fails on those (``IndexError``: it reads the first state entry
        to tell how the state is keyed). There is no state to load then: the weights load as usual and each
        optimizer's hyperparameters (``lr``, ...) come from its saved param groups."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            check_sharded_checkpoint(path)  # names a missing or truncated file (Lightning's loader did not)
        if _is_sharded_checkpoint(path):
            return self._load_sharded_checkpoint(path)
        if not _is_full_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only).get("optimizer_states", [])
        if any(state["state"] for state in saved):
            return super().load_checkpoint(path, weights_only)
        assert self.lightning_module is not None
        remaining = _load_checkpoint(
            path=path,
            state={"state_dict": self.model},
            strict=self.lightning_module.strict_loading,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )
        for optimizer, state in zip(self.optimizers, saved, strict=False):
            for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({key: value for key, value in saved_group.items() if key != "params"})
        return remaining

    def _load_sharded_checkpoint(self, path: Path) -> dict[str, Any]:
        """Lightning's loading of a sharded checkpoint (weights, then each optimizer, then ``meta.pt``), read
        through ``lit_gcpo.running.sharded_checkpoint``: Lightning's own reads the shards' index with plain pickle and
        their non-tensor items with ``weights_only=False``, which runs code a crafted checkpoint holds."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        assert self.lightning_module is not None
        module = self.model
        weights = {"state_dict": get_model_state_dict(module)}
        load_sharded(weights, path)
        module.load_state_dict(weights["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(module, optimizer)}
            load_sharded(state, path)
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key], options=options)
        return read_meta(path)


class SharedWriteError(RuntimeError):
    """Another rank failed its part of writing a sharded checkpoint."""


def _complete(checkpoint: dict[str, Any], temporary: Path, target: Path) -> None:
    """Rank 0's end of a sharded write: ``meta.pt`` (the file a sharded checkpoint is recognised by) into the
    directory that holds every shard, the directory synced, then renamed onto ``target``."""
    atomic_torch_save(checkpoint, temporary / META_FILE)
    fsync_directory(temporary)  # the shards' and the index's names (torch.distributed.checkpoint synced their data)
    replace_directory(temporary, target)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over all ranks, GPU or CPU (lit-gcpo)"
    )


def is_sharded(strategy: Strategy | None) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def shard_causal_lm(model: torch.nn.Module, mesh: Any) -> None:
    """Apply FSDP2 to a transformers causal LM: each decoder layer a unit, the model the root.

    A unit gathers its parameters in one buffer of one dtype, so a layer that mixes dtypes (the bf16-mixed
    reference: bf16 linear layers, fp32 norms) gets one unit per linear layer inside it; gathering them
    together made the ranks' collectives disagree on sizes.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return  # configure_model may run more than once (fit, then test)
    for layer in model.get_decoder().layers:
        if len({p.dtype for p in layer.parameters()}) > 1:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    fully_shard(module, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def gradient_sync(strategy: Strategy, model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Let backward passes inside reduce gradients over ranks only when ``enabled`` (the last micro-batch of
    an optimizer step); otherwise they accumulate locally and the next synced backward reduces the sum."""
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(strategy, ParallelStrategy):
        with strategy.block_backward_sync():  # DDP's no_sync
            yield
    else:
        yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a full tensor (a collective: every rank must call it); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def unsupported_option(strategy: Any, precision: Any) -> str | None:
    """Why GRPOModule cannot honour this Trainer ``strategy`` / ``precision`` (names or objects), or None."""
    name = _strategy_name(strategy)
    if "deepspeed" in name.lower():
        return (
            f"trainer.strategy {name}: DeepSpeed is not supported (it owns gradient clipping and the optimizer "
            "step, which GRPOModule runs itself several times per rollout batch, so clipping would silently "
            "not happen); use --trainer.strategy fsdp2 for sharded training"
        )
    if name == "fsdp" or "FSDPStrategy" in name:
        return (
            f"trainer.strategy {name}: Lightning's FSDP (FSDP1) is not supported; use --trainer.strategy fsdp2 "
            "(FSDP2, which also runs on CPUs)"
        )
    if isinstance(strategy, str) and name not in SUPPORTED_STRATEGIES and "." not in name:
        return f"trainer.strategy {name}: not supported; use one of {', '.join(SUPPORTED_STRATEGIES)}"
    precision = str(precision) if precision is not None else "32-true"
    if precision not in SUPPORTED_PRECISIONS:
        hint = (
            "fp16 needs loss scaling, which GRPOModule's own optimizer steps do not do; use bf16-mixed"
            if precision.startswith("16")
            else "use bf16-mixed or 32-true"
        )
        return f"trainer.precision {precision}: not supported ({hint})"
    return None


def _strategy_name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, dict):  # a class_path/init_args mapping from a config file
        return str(strategy.get("class_path", ""))
    if hasattr(strategy, "class_path"):  # the same, parsed (a jsonargparse Namespace)
        return str(strategy.class_path)
    if isinstance(strategy, FSDP2Strategy):
        return "fsdp2"
    return type(strategy).__name__
