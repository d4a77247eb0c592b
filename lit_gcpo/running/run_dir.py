"""Claiming a run's log directory so that no two runs ever write into one.

Lightning's TensorBoard and CSV loggers pick ``version_N`` by listing the directories that exist when the
version is first read, so two runs started close together both chose ``version_0`` and mixed their
checkpoints, configs and event files. A run here claims its directory before anything is written: it creates
``run_claim.json`` inside with ``O_CREAT | O_EXCL``, which exactly one process can do. An automatic version
moves on to the next number when the claim fails; a fixed version (``logger.init_args.version``) is refused.
A directory without a claim but with a run's files (from before claims existed) counts as taken; other files
(e.g. a launcher's own log) do not.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

CLAIM_FILE = "run_claim.json"
"""Created exclusively in a run's log directory by the run that owns it."""

RUN_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "checkpoints", "policy", "events.out.tfevents.*")
"""Names (globs) whose presence shows that a directory holds a run."""


class RunDirectoryTakenError(RuntimeError):
    """A fixed log directory already belongs to another run."""


def _holds_a_run(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in RUN_FILES)


def claim_directory(directory: Path) -> bool:
    """Claim ``directory`` (created if needed) for this process; False if another run holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    claim = directory / CLAIM_FILE
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    if _holds_a_run(directory):
        os.close(fd)
        claim.unlink()
        return False
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "argv": sys.argv}
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return True


EMPTY_EVENT_FILE_BYTES = 128
"""TensorBoard opens its event file before the data is set up, writing only its version record (88 bytes)."""


def release_directory(directory: Path) -> bool:
    """Give back ``directory`` if this process claimed it and it holds nothing but the claim and an empty event
    file (a run that failed at setup): remove them and the directory. Returns whether it was released."""
    claim = directory / CLAIM_FILE
    try:
        files = [path for path in directory.iterdir() if path.name != CLAIM_FILE]
        empty = all(
            path.name.startswith("events.out.tfevents.") and path.stat().st_size <= EMPTY_EVENT_FILE_BYTES
            for path in files
        )
        if not empty or json.loads(claim.read_text())["pid"] != os.getpid():
            return False
        for path in [*files, claim]:
            path.unlink()
        directory.rmdir()
    except (OSError, ValueError, KeyError):
        return False
    return True


def claim_logger_directory(logger: Any) -> Path | None:
    """Claim the log directory of a TensorBoard or CSV logger, fixing its version to the claimed one.

    Returns the claimed directory, or None for a logger that has no versioned directory. Raises
    ``RunDirectoryTakenError`` when the logger's fixed version belongs to another run.
    """
    if not (hasattr(logger, "_version") and hasattr(logger, "_get_next_version") and hasattr(logger, "root_dir")):
        return None
    if logger._version is not None:
        version = logger._version
        directory = Path(logger.root_dir) / (version if isinstance(version, str) else f"version_{version}")
        if not claim_directory(directory):
            raise RunDirectoryTakenError(
                f"logger version {logger._version!r}: {directory} already holds a run; a run never writes into "
                "another's directory. Leave trainer.logger.init_args.version unset (a new version_N is made) or "
                "choose another version (to continue that run, pass its checkpoint with --ckpt_path)"
            )
        return directory
    version = logger._get_next_version()
    while not claim_directory(Path(logger.root_dir) / f"version_{version}"):
        version += 1  # another run took this one between the listing and the claim
    logger._version = version
    return Path(logger.root_dir) / f"version_{version}"
