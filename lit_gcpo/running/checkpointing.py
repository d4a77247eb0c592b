"""Checkpoints that are complete or absent: atomic writes, integrity checks, and finding the newest good one.

Lightning writes a checkpoint through an fsspec transaction whose temporary file lives in the system's
temp folder; when that folder is on another filesystem, the final "rename" is a copy into the target, so
a kill during it left ``last.ckpt`` at 0 bytes (the previous good one destroyed), and a full disk left a
torn ``stepN.ckpt``. ``AtomicCheckpointIO`` writes next to the target and renames:

1. ``torch.save`` into ``.<name>.tmp-<pid>`` in the target's directory, ``fsync`` it;
2. ``os.replace`` it onto the target (atomic within a directory), ``fsync`` the directory;
3. on any failure, remove the temporary file and re-raise: the previous checkpoint is untouched.

Remote paths (``s3://``...) keep Lightning's own writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

KEYWORDS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that Lightning resolves itself rather than naming a file."""


def _temporary_name(target: Path) -> str:
    return f".{target.name}.tmp-"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a new file that then replaces ``target`` at once: ``target`` is either its previous
    content or the complete new one, whenever the process dies."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(_temporary_name(target) + "*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    temporary = target.parent / f"{_temporary_name(target)}{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_directory(target.parent)


def atomic_torch_save(obj: Any, target: str | Path) -> None:
    """``torch.save(obj, target)`` such that ``target`` is either its previous content or the complete new one."""
    atomic_write(target, lambda handle: torch.save(obj, handle))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with the atomic local write of :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def check_checkpoint(path: str) -> None:
    """Fail early, naming the file, when a checkpoint is missing, truncated or not a torch archive."""
    if path in KEYWORDS or path.startswith("registry:"):
        return
    file = Path(path)
    if file.is_dir() and (file / "meta.pt").is_file():
        return  # a sharded (distributed) checkpoint: one file per rank, read by the strategy
    if not file.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {path}")
    if not zipfile.is_zipfile(file):
        raise ValueError(
            f"ckpt_path: {path} is truncated or corrupt ({file.stat().st_size} bytes, not a complete torch "
            "archive); resume from an earlier checkpoint, e.g. another file in the same directory"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"ckpt_path: {path} is truncated or corrupt ({err})") from err
    if bad is not None:
        raise ValueError(f"ckpt_path: {path} is corrupt (member {bad} fails its checksum)")


def newest_complete_checkpoint(root: str) -> str:
    """The most recently written complete ``*.ckpt`` below ``root``: ``last.ckpt`` or a newer ``stepN.ckpt``
    (a run killed between writing the two), skipping, with a warning, files that fail :func:`check_checkpoint`.

    Every run's logger makes a new version directory, so Lightning's own ``"last"``, which looks in the new
    run's directory, would find nothing.
    """
    candidates = sorted(Path(root).rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for candidate in candidates:
        try:
            check_checkpoint(str(candidate))
        except (ValueError, FileNotFoundError) as error:  # torn, or a sharded directory without its metadata
            log.warning("skipping %s", error)
            continue
        return str(candidate)
    raise FileNotFoundError(
        f"ckpt_path last: no complete checkpoint (*.ckpt) below trainer.default_root_dir={root}"
        + (f" ({len(candidates)} incomplete)" if candidates else "")
    )
