"""Sharded checkpoints are complete or absent: a crash while one is written leaves the previous one as it was,
``--ckpt_path last`` resumes from it, and an incomplete one given explicitly is refused naming what it lacks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_cli import _short_fit_args

from lit_gcpo.running.checkpointing import check_checkpoint, newest_complete_checkpoint, replace_directory
from lit_gcpo.running.sharded_checkpoint import IncompleteCheckpointError, read_meta

HERE = Path(__file__).parent
REPO = HERE.parent
SHARDED = ["--trainer.strategy", "fsdp2", "--trainer.strategy.save_distributed_checkpoint", "true"]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _fit(tiny_model_dir: str, root: Path, steps: int, mode: str, *extra: str) -> subprocess.CompletedProcess:
    """A 2-rank sharded fit through the CLI, validating (and writing last.ckpt) every 2 steps, with no other
    checkpoint callback, torch's shard writer patched by ``sharded_crash_run.py``."""
    args = [*_short_fit_args(tiny_model_dir, root, steps), *SHARDED, "--trainer.devices", "2"]
    args += ["--trainer.callbacks", "[]", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_RUN_OUT": str(root), "CRASH_RUN_MODE": mode}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(HERE / "sharded_crash_run.py"), "fit", *args]
    return subprocess.run(
        command, cwd=REPO, env=env, timeout=900, capture_output=True, text=True, start_new_session=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_crash_inside_a_sharded_write_keeps_the_previous_checkpoint_and_last_resumes_it(
    tiny_model_dir, tmp_path, mode
):
    crashed = _fit(tiny_model_dir, tmp_path, 4, mode)  # last.ckpt at step 2, then the crash writing step 4's
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    if mode == "raise":
        assert "simulated crash writing" in crashed.stderr
    else:
        assert crashed.returncode == -9
    last = next(tmp_path.rglob("last.ckpt"))
    # the step-2 checkpoint, byte for byte: each rank's shard as it wrote it then (Lightning wrote the new shards
    # over it in place: rank 0's held step 4's weights, rank 1's was cut short, meta.pt still said step 2)
    for rank in (0, 1):
        written = json.loads((tmp_path / f"rank{rank}-write1.json").read_text())
        assert written, "the first write recorded no shard"
        for name, digest in written.items():
            assert hashlib.sha256((last / name).read_bytes()).hexdigest() == digest, f"{name} of rank {rank}"
    assert read_meta(last)["global_step"] == 2
    check_checkpoint(str(last))
    leftovers = [p for p in last.parent.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    if mode == "raise":  # the writers removed their temporary directory themselves
        assert leftovers == []
    else:  # SIGKILL: nothing could; the next fit removes it once it is old enough to be no live writer's
        assert len(leftovers) == 1 and (leftovers[0] / "__0_0.distcp").is_file()
        for file in [leftovers[0], *leftovers[0].rglob("*")]:
            os.utime(file, (time.time() - 3600, time.time() - 3600))

    resumed = _fit(tiny_model_dir, tmp_path, 3, "none", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--ckpt_path last: {last}," in resumed.stdout
    assert f"resuming from {last}" in resumed.stdout and "step 2" in resumed.stdout
    if mode == "kill":
        assert f"removed the temporary checkpoint files of killed runs: {leftovers[0]}" in resumed.stdout
    assert not any(p.name.startswith(".last.ckpt.tmp-") for p in last.parent.iterdir())
    newest = sorted(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert newest != last and read_meta(newest)["global_step"] == 3
    check_checkpoint(str(newest))


def _sharded(directory: Path, step: int) -> Path:
    """A one-rank sharded checkpoint in the layout Lightning writes (shards, their index, meta.pt)."""
    state = {"state_dict": {"w": torch.arange(2000.0) + step}}
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({"global_step": step}, directory / "meta.pt")
    return directory


def test_an_incomplete_sharded_checkpoint_is_refused_naming_what_it_lacks_and_last_skips_it(tmp_path):
    run = tmp_path / "gcpo" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    good = _sharded(run / "step2.ckpt", 2)
    os.utime(good, (time.time() - 60, time.time() - 60))
    broken = _sharded(run / "step4.ckpt", 4)  # newer
    shard = broken / "__0_0.distcp"
    size = shard.stat().st_size  # 2000 float32 = 8000 bytes of data, plus torch's framing
    os.truncate(shard, size // 2)
    with pytest.raises(
        IncompleteCheckpointError,
        match=rf"ckpt_path: .*step4\.ckpt is not a complete sharded checkpoint; missing: __0_0\.distcp \(truncated: "
        rf"{size // 2} bytes, its items end at byte {size}\)",
    ):
        check_checkpoint(str(broken))
    assert newest_complete_checkpoint(str(tmp_path)) == str(good)
    shard.unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"missing: __0_0\.distcp \(a shard the index names\)"):
        check_checkpoint(str(broken))
    (broken / "meta.pt").unlink()
    (broken / ".metadata").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"missing: meta\.pt .*; \.metadata \(the index of the shards"):
        check_checkpoint(str(broken))
    assert newest_complete_checkpoint(str(tmp_path)) == str(good)


def test_replacing_a_directory_keeps_one_complete_version_in_place(tmp_path, monkeypatch):
    """The swap (renameat2) and the fallback without it (two renames: a kill between them leaves the previous one
    aside, which the next writer puts back before anything else)."""
    import lit_gcpo.running.checkpointing as checkpointing

    target = _sharded(tmp_path / "last.ckpt", 2)
    replace_directory(_sharded(tmp_path / ".last.ckpt.tmp-1", 4), target)
    assert read_meta(target)["global_step"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def killed_between(source, destination):
        real_replace(source, destination)
        if Path(destination).name.startswith(".last.ckpt.tmp-old-"):
            raise KeyboardInterrupt  # the previous one is aside, the new one not yet in place

    monkeypatch.setattr(os, "replace", killed_between)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(_sharded(tmp_path / ".last.ckpt.tmp-2", 6), target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    checkpointing.new_temporary_directory(target)  # the next writer
    assert read_meta(target)["global_step"] == 4  # put back, complete
