"""Sharded (``save_distributed_checkpoint``) checkpoints: checked complete, and read without running code from them.

A sharded checkpoint is a directory: ``meta.pt`` (Lightning's loops, callbacks, hyper-parameters), ``.metadata``
(torch.distributed.checkpoint's index of the shards) and one ``__<rank>_0.distcp`` file per rank.
``FSDP2Strategy.save_checkpoint`` (``lit_gcpo.training.parallel``) writes them into a temporary sibling, ``meta.pt``
last, and renames that into place once every rank's shard is written; :func:`check_sharded_checkpoint` names what an
incomplete one (a partial copy, a directory half removed) lacks. PyTorch's
reader unpickles ``.metadata`` with plain ``pickle`` and every non-tensor item in the shards (an optimizer's
``lr``, ``betas``...) with ``torch.load(weights_only=False)``: a crafted directory given to ``--ckpt_path`` ran
any code it held. Here:

- ``.metadata`` goes through an unpickler that admits only the classes torch.distributed.checkpoint writes
  there (:data:`METADATA_GLOBALS`) and refuses any other global (``os.system``...) before calling it;
- non-tensor items go through ``torch.load(weights_only=True)``, tensors already do;
- ``meta.pt`` is read with ``weights_only=True``.

Anything else is refused with :class:`UnsafeCheckpointError` naming the file.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

META_FILE = "meta.pt"
"""Lightning's non-tensor part of a sharded checkpoint, written by rank 0."""

METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"} | {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "torch.serialization": {"_get_layout"},  # a layout (torch.strided) from its name
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""The globals a ``.metadata`` file may name: what torch.distributed.checkpoint writes (measured on a real
checkpoint of this project: the metadata classes, ``_StorageInfo``, ``torch.Size``, dtypes, the layout and the
checkpoint's path). Each only builds a value from its arguments."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than the data a checkpoint holds (e.g. code to run)."""


class IncompleteCheckpointError(ValueError):
    """A sharded checkpoint lacks a file, or holds a truncated one."""


def missing_parts(directory: Path) -> list[str]:
    """What the sharded checkpoint ``directory`` lacks, in words (empty when it is complete): ``meta.pt``,
    ``.metadata``, a shard file its index names, or a shard shorter than the end of the last item the index places
    in it. A crafted ``.metadata`` is refused (:func:`read_metadata`) before anything else is read."""
    problems = [] if (directory / META_FILE).is_file() else [f"{META_FILE} (the loops' state, written last)"]
    index = directory / ".metadata"
    if not index.is_file():
        return [*problems, ".metadata (the index of the shards)"]
    storage = read_metadata(index).storage_data
    ends: dict[str, int] = {}  # shard file -> the end of its last item, in bytes
    for info in storage.values() if isinstance(storage, dict) else ():
        if isinstance(getattr(info, "relative_path", None), str) and getattr(info, "length", -1) >= 0:
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} (a shard the index names)")
        elif file.stat().st_size < end:
            problems.append(f"{name} (truncated: {file.stat().st_size} bytes, its items end at byte {end})")
    return problems


def check_sharded_checkpoint(directory: str | Path) -> None:
    """Raise :class:`IncompleteCheckpointError` naming each missing or truncated file of the sharded checkpoint
    ``directory``."""
    problems = missing_parts(Path(directory))
    if problems:
        raise IncompleteCheckpointError(
            f"{directory} is not a complete sharded checkpoint; missing: {'; '.join(problems)}. It was not completely "
            "written or copied: resume from another checkpoint (e.g. another one in the same directory)"
        )


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a torch.distributed.checkpoint metadata class")


def read_metadata(file: Path) -> Metadata:
    """The torch.distributed.checkpoint index in ``file``, read without calling anything but the metadata
    classes; raises :class:`UnsafeCheckpointError` naming the file otherwise."""
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise UnsafeCheckpointError(
            f"{file}: refused, not a torch.distributed.checkpoint metadata file ({error}); a checkpoint "
            "holds data only, and this one may have been crafted to run code when loaded"
        ) from error
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{file}: refused, holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with :func:`read_metadata` in place of plain ``pickle``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """The default planner, except that a non-tensor item must pass ``torch.load(weights_only=True)``.

    A refused item is recorded in ``refused`` (key, error) and left unset: raising here would reach the caller
    wrapped in torch's ``CheckpointException``; :func:`load_sharded` raises the clear error after the load."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[str, str]] = []

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            self.refused.append((read_item.dest_index.fqn, str(error).splitlines()[0]))
            return
        # Accepted by the weights-only unpickler: the default planner's own load of these very bytes meets only
        # the globals that unpickler allowed.
        value.seek(0)
        super().load_bytes(read_item, value)


def load_sharded(state: dict[str, Any], directory: Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load(state, directory)`` through :class:`SafeFileSystemReader` and
    :class:`WeightsOnlyLoadPlanner`; a collective unless ``no_dist``."""
    index = Path(directory) / ".metadata"
    if index.is_file():  # refused here, the error is the clear one (torch's loader wraps its reader's errors)
        read_metadata(index)
    planner = WeightsOnlyLoadPlanner()
    dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=planner, no_dist=no_dist)
    if planner.refused:
        key, error = planner.refused[0]
        raise UnsafeCheckpointError(
            f"{directory}: refused, its shard item {key!r} is not plain data ({error}); a checkpoint holds data "
            "only, and this one may have been crafted to run code when loaded"
        )


def read_meta(directory: Path) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint, read with ``weights_only=True``."""
    file = directory / META_FILE
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{file}: refused, not plain checkpoint data ({str(error).splitlines()[0]})"
        ) from error
    if not isinstance(meta, dict):
        raise UnsafeCheckpointError(f"{file}: refused, holds a {type(meta).__name__}, not a checkpoint's dict")
    return meta


def read_sharded_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's non-tensor content, checked: ``meta.pt`` plus ``optimizer_states`` holding each
    optimizer's ``param_groups`` (as a single-file checkpoint has them), read in this process alone.

    Reads ``.metadata`` and every non-tensor shard item through the safe readers above, so it refuses a crafted
    directory before anything else opens it."""
    directory = Path(directory)
    meta = read_meta(directory)
    metadata = read_metadata(directory / ".metadata")
    items: dict[str, Any] = {
        key: None for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)
    }
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load_sharded(items, directory, no_dist=True)
    optimizers: dict[int, dict[int, dict[str, Any]]] = {}
    for key, value in items.items():  # "optimizer_<i>.param_groups.<g>.<name>"
        parts = key.split(".")
        if len(parts) == 4 and parts[0].startswith("optimizer_") and parts[1] == "param_groups":
            groups = optimizers.setdefault(int(parts[0].removeprefix("optimizer_")), {})
            groups.setdefault(int(parts[2]), {})[parts[3]] = value
    meta["optimizer_states"] = [
        {"param_groups": [groups[g] for g in sorted(groups)]} for _, groups in sorted(optimizers.items())
    ]
    return meta
