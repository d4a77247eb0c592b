"""Run by tests/test_sharded_checkpoint_writes.py: the ``lit-gcpo`` command with torch's shard writer patched.

    CRASH_RUN_OUT=DIR CRASH_RUN_MODE=raise|kill python sharded_crash_run.py fit --config ...

The patch is in torch.distributed.checkpoint's ``FileSystemWriter.write_data`` (below the project's code, so that
the test applies to any way of writing the shards). Every write into a path naming ``last.ckpt`` is counted; after
each, the rank records the sha256 of the shard it wrote in ``DIR/rank<r>-write<n>.json``. The second such write
on rank 1 writes its shard, cuts it to half its size and then raises ``OSError`` (``raise``) or kills every process of
the run with SIGKILL (``kill``: what a preemption without a grace period or the out-of-memory killer does).
Lightning starts rank 1 by running this script again, with the same environment: both ranks are patched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from lit_gcpo.running.cli import console_main

CRASH_AT = 2  # the second write of last.ckpt: the first one is the previous good checkpoint

_real_write_data = FileSystemWriter.write_data
_writes = 0


def _write_data(self, plan, planner):
    global _writes
    future = _real_write_data(self, plan, planner)
    if "last.ckpt" not in str(self.path):
        return future
    _writes += 1
    rank = dist.get_rank()
    shards = {file.name: file for file in Path(self.path).glob(f"__{rank}_*.distcp")}
    if _writes == CRASH_AT and rank == 1:
        for file in shards.values():
            os.truncate(file, file.stat().st_size // 2)
        if os.environ["CRASH_RUN_MODE"] == "kill":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        raise OSError(f"simulated crash writing {self.path} on rank 1")
    digests = {name: hashlib.sha256(file.read_bytes()).hexdigest() for name, file in shards.items()}
    (Path(os.environ["CRASH_RUN_OUT"]) / f"rank{rank}-write{_writes}.json").write_text(json.dumps(digests))
    return future


FileSystemWriter.write_data = _write_data

if __name__ == "__main__":
    console_main()
