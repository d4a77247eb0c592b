"""Checkpoints that are complete or absent: atomic writes, integrity checks, and finding the newest good one.

Lightning writes a checkpoint through an fsspec transaction whose temporary file lives in the system's
temp folder; when that folder is on another filesystem, the final "rename" is a copy into the target, so
a kill during it left ``last.ckpt`` at 0 bytes (the previous good one destroyed), and a full disk left a
torn ``stepN.ckpt``. ``AtomicCheckpointIO`` writes next to the target and renames:

1. ``torch.save`` into ``.<name>.tmp-<pid>`` in the target's directory, ``fsync`` it;
2. ``os.replace`` it onto the target (atomic within a directory), ``fsync`` the directory;
3. on any failure, remove the temporary file and re-raise: the previous checkpoint is untouched. A full disk
   is said as such, naming the checkpoint (torch reported it as ``RuntimeError: ... unexpected pos``).

Remote paths (``s3://``...) keep Lightning's own writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_gcpo.running.sharded_checkpoint import (
    IncompleteCheckpointError,
    check_sharded_checkpoint,
    read_sharded_checkpoint,
)

log = logging.getLogger(__name__)

KEYWORDS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that Lightning resolves itself rather than naming a file."""


def _temporary_name(target: Path) -> str:
    return f".{target.name}.tmp-"


def fsync_directory(directory: Path) -> None:
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
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if _out_of_space(error, target.parent):
            kept = "the previous one is intact" if target.exists() else "no file was written"
            raise NoSpaceLeftError(
                errno.ENOSPC, f"no space left on the device writing checkpoint {target} ({kept}); free space"
            ) from error
        raise
    fsync_directory(target.parent)


class NoSpaceLeftError(OSError):
    """A checkpoint did not fit on its disk (``errno.ENOSPC``); the message names the checkpoint."""


def _out_of_space(error: BaseException, directory: Path) -> bool:
    """Whether ``error`` comes from a full disk. torch.save reports a failed write as ``RuntimeError: [enforce fail
    at inline_container.cc:672] unexpected pos``, with the ``OSError(ENOSPC)`` only in its context."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(directory).free < 1 << 20
    return False


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """A new directory to fill that then takes the place of ``target``: a kill while it is filled leaves ``target``
    as it was (absent, or the previous complete one), never half written. Temporary directories left by killed
    writers are removed first."""
    target = Path(target)
    temporary = new_temporary_directory(target)
    try:
        yield temporary
        replace_directory(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def new_temporary_directory(target: Path) -> Path:
    """An empty ``.<name>.tmp-<pid>`` next to ``target``, to fill and then :func:`replace_directory` onto it. The
    temporary siblings of ``target`` that killed writers left are removed first (an aside of a previous ``target``
    whose replacement was cut short is put back in its place, see :func:`replace_directory`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore_aside(target)
    for stale in target.parent.glob(_temporary_name(target) + "*"):
        _remove(stale)
    temporary = target.parent / f"{_temporary_name(target)}{os.getpid()}"
    temporary.mkdir()
    return temporary


def replace_directory(source: Path, target: Path) -> None:
    """Put the complete directory ``source`` in the place of ``target`` (absent, a directory or a file), such that
    ``target`` is at every moment either the previous one or the new one, then remove the previous one.

    A directory cannot be renamed onto another: where the filesystem can (Linux: ext4, xfs, btrfs, tmpfs), the two
    are swapped by one ``renameat2(RENAME_EXCHANGE)``; elsewhere (e.g. NFS) the previous ``target`` is renamed to
    ``.<name>.tmp-old-<pid>`` first, and a kill between the two renames leaves no ``target``: the next writer of
    ``target`` and the next fit (:func:`remove_stale_temporary_files`) put that aside back."""
    if not os.path.lexists(target):
        os.replace(source, target)
    elif _exchange(source, target):
        _remove(source)  # now the previous one
    else:
        aside = target.parent / f"{_temporary_name(target)}old-{os.getpid()}"
        os.replace(target, aside)
        os.replace(source, target)
        _remove(aside)
    fsync_directory(target.parent)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the system or filesystem cannot (nothing moved)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"swapping {a} and {b}: {os.strerror(code)}")


ASIDE = re.compile(r"^\.(.+)\.tmp-old-(\d+)$")
"""``.<name>.tmp-old-<pid>``: the previous ``<name>``, moved aside by :func:`replace_directory` without an exchange."""


def _restore_aside(target: Path) -> bool:
    """Put back the previous ``target`` that a writer killed between its two renames left aside; True if it did."""
    if os.path.lexists(target):
        return False
    for aside in target.parent.glob(f"{_temporary_name(target)}old-*"):
        os.replace(aside, target)
        return True
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


TEMPORARY_FILE = re.compile(r"^\..+\.tmp-(\d+)$")
"""``.<name>.tmp-<pid>``: a checkpoint (a file, or a sharded checkpoint's directory) being written by process ``pid``
(:func:`atomic_write`, :func:`new_temporary_directory`)."""


def remove_stale_temporary_files(root: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove the temporary checkpoint files and directories below ``root`` that killed writers left: their process
    is gone and nothing in them has changed for ``min_age_s`` (a writer on another host of a shared filesystem keeps
    them changing). A previous checkpoint left aside by a writer killed while replacing it is put back (see
    :func:`replace_directory`). Returns the removed paths. A resumed run writes into a new version directory, so the
    old one's temporary files were never cleaned by the next write of the same checkpoint."""
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp-*")):
        aside = ASIDE.match(path.name)
        if aside is not None and not _process_alive(int(aside.group(2))):
            target = path.parent / aside.group(1)
            if _restore_aside(target):
                log.warning("put back %s, left aside by a writer killed while replacing it", target)
            continue
        match = TEMPORARY_FILE.match(path.name)
        if match is None or not path.exists() or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if time.time() - _last_change(path) >= min_age_s:
                _remove(path)
                removed.append(path)
    return removed


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a directory, of the files in it."""
    times = [path.stat().st_mtime] + ([item.stat().st_mtime for item in path.rglob("*")] if path.is_dir() else [])
    return max(times)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


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
    if file.is_dir():  # a sharded checkpoint: a directory of one file per rank
        try:
            check_sharded_checkpoint(file)
        except IncompleteCheckpointError as error:
            raise IncompleteCheckpointError(f"ckpt_path: {error}") from error
        read_sharded_checkpoint(file)  # refuses one crafted to run code when loaded
        return
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
        except (ValueError, FileNotFoundError) as error:  # torn, or a sharded directory missing a file
            log.warning("skipping %s", error)
            continue
        return str(candidate)
    raise FileNotFoundError(
        f"ckpt_path last: no complete checkpoint (*.ckpt) below {root}"
        + (f" ({len(candidates)} incomplete)" if candidates else "")
    )
