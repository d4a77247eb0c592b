"""Checkpoint writes are atomic; ``--ckpt_path last`` takes the newest complete checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_cli import _short_fit_args

import lit_gcpo.running.checkpointing as checkpointing
from lit_gcpo.running.checkpointing import atomic_torch_save, newest_complete_checkpoint
from lit_gcpo.running.cli import main

REPO = Path(__file__).parents[1]


def _cross_device_with_a_full_disk(monkeypatch) -> list[tuple[str, str]]:
    """The temp folder on another filesystem (a rename fails with EXDEV, so a move copies into the target)
    and a disk that fills half-way through that copy. Returns the renames that did happen."""
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def rename(src, dst):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        renames.append((str(src), str(dst)))
        real_replace(src, dst)

    def copy_half(source, target, *, follow_symlinks=True):
        with open(source, "rb") as reader, open(target, "wb") as writer:
            writer.write(reader.read(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    return renames


def test_the_trainers_checkpoint_write_survives_a_foreign_temp_folder_and_a_full_disk(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    cli = main([*_short_fit_args(tiny_model_dir, tmp_path, steps=1)], run=False)
    io = cli.trainer.strategy.checkpoint_io
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    renames = _cross_device_with_a_full_disk(monkeypatch)
    io.save_checkpoint({"step": torch.tensor(2)}, target)
    assert torch.load(target, weights_only=True)["step"] == 2  # complete, never copied into place
    assert renames and Path(renames[-1][0]).parent == tmp_path  # the temporary file was next to the target
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["last.ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint_and_removes_the_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "step3.ckpt"
    atomic_torch_save({"weights": torch.arange(1000.0)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def full_disk(obj, handle):
        real_save(obj, handle)
        handle.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"weights": torch.zeros(1000)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step3.ckpt"]


def test_ckpt_path_last_takes_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "gcpo" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    paths = {}
    for age, name in [(30, "last.ckpt"), (20, "step5.ckpt"), (10, "step6.ckpt")]:  # step6 newest
        paths[name] = run / name
        torch.save({"name": name}, paths[name])
        stamp = time.time() - age
        os.utime(paths[name], (stamp, stamp))
    # killed while writing last.ckpt after step5.ckpt: a newer stepN than last
    assert newest_complete_checkpoint(str(tmp_path)) == str(paths["step6.ckpt"])
    data = paths["step6.ckpt"].read_bytes()
    paths["step6.ckpt"].write_bytes(data[: len(data) // 2])  # torn (written without the atomic writer)
    os.utime(paths["step6.ckpt"], (time.time() - 10, time.time() - 10))
    (run / ".last.ckpt.tmp-123").write_bytes(b"partial")  # a killed writer's temporary file
    (run / "step7.ckpt").mkdir()  # a sharded checkpoint whose metadata file was never written
    assert newest_complete_checkpoint(str(tmp_path)) == str(paths["step5.ckpt"])
    torch.save({"global_step": 7}, run / "step7.ckpt" / "meta.pt")  # complete: its rank files and metadata
    assert newest_complete_checkpoint(str(tmp_path)) == str(run / "step7.ckpt")
