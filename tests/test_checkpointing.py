"""Checkpoint writes are atomic; ``--ckpt_path last`` takes the newest complete checkpoint."""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
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
    with pytest.raises(OSError, match=r"no space left on the device writing checkpoint .*step3\.ckpt"):
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
    torch.save({"global_step": 7}, run / "step7.ckpt" / "meta.pt")  # its shards' index is still missing
    assert newest_complete_checkpoint(str(tmp_path)) == str(paths["step5.ckpt"])
    torch.distributed.checkpoint.save({"w": torch.ones(2)}, checkpoint_id=run / "step7.ckpt", no_dist=True)
    assert newest_complete_checkpoint(str(tmp_path)) == str(run / "step7.ckpt")


def test_last_ckpt_is_the_newest_checkpoint_beside_the_quickstarts_monitored_one(tiny_model_dir, tmp_path, monkeypatch):
    """The quickstart pairs save_last with a ModelCheckpoint on val/accuracy; Lightning 2.6 rewrote last.ckpt only
    when the accuracy improved, and not at the end of a fit whose last step is no validation step."""
    monkeypatch.chdir(REPO)
    cli = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=5)])  # validations at steps 2 and 4
    assert [step for step, _ in cli.model.validation_history] == [2, 4]
    directory = next(tmp_path.rglob("checkpoints"))
    last = torch.load(directory / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5 and last["RolloutDataModule"]["consumed_batches"] == 5
    monitored = [p.name for p in directory.glob("step*.ckpt")]
    assert len(monitored) == 1  # the ModelCheckpoint still keeps its best, by val/accuracy
    assert sorted(p.name for p in directory.iterdir()) == sorted(["last.ckpt", *monitored])


class _FillsAfter:
    """A file handle on a disk that fills after ``room`` bytes: the write then fails with ENOSPC, as the OS does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_says_no_space_left_naming_the_checkpoint_and_keeps_the_previous(
    tiny_model_dir, tmp_path, monkeypatch
):
    """torch.save's own report of it was ``RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos``."""
    monkeypatch.chdir(REPO)
    io = main([*_short_fit_args(tiny_model_dir, tmp_path, steps=1)], run=False).trainer.strategy.checkpoint_io
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(1000.0)}, target)
    before = target.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(checkpointing.torch, "save", lambda obj, handle: real_save(obj, _FillsAfter(handle, 1000)))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what torch itself raises on a full disk
        real_save({"weights": torch.zeros(1000)}, _FillsAfter(open(tmp_path / "probe", "wb"), 1000))  # noqa: SIM115
    (tmp_path / "probe").unlink()
    full = rf"no space left on the device writing checkpoint {re.escape(str(target))} \(the previous one is intact"
    with pytest.raises(OSError, match=full):
        io.save_checkpoint({"weights": torch.zeros(1000)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["last.ckpt"]
    with pytest.raises(OSError, match=r"writing checkpoint .*step9\.ckpt \(no file was written\)"):
        io.save_checkpoint({"weights": torch.zeros(1000)}, tmp_path / "step9.ckpt")


def test_an_interrupted_export_leaves_no_partial_policy_and_the_next_one_cleans_up(
    tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gcpo.training.policy import save_policy

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    target = tmp_path / "policy"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the weights are written, the tokenizer is not

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            save_policy(model, tokenizer, str(target), uses_lora=False, write=True)
    assert list(tmp_path.iterdir()) == []  # no empty or half-written policy/
    leftover = tmp_path / ".policy.tmp-999999"  # what a SIGKILL (no clean-up possible) leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    for _ in range(2):  # a first export, then one over it
        save_policy(model, tokenizer, str(target), uses_lora=False, write=True)
        assert [p.name for p in tmp_path.iterdir()] == ["policy"]
        exported = AutoModelForCausalLM.from_pretrained(target).state_dict()
        assert all(torch.equal(exported[name], value) for name, value in model.state_dict().items())
        assert (target / "tokenizer_config.json").is_file()


def test_temporary_files_of_killed_writers_are_removed_at_the_next_fit(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old_run = tmp_path / "gcpo" / "version_0" / "checkpoints"
    old_run.mkdir(parents=True)
    stale = old_run / f".last.ckpt.tmp-{int(dead.stdout)}"  # its writer was killed
    live = old_run / f".step3.ckpt.tmp-{os.getpid()}"  # its writer is still running
    fresh = old_run / f".step4.ckpt.tmp-{int(dead.stdout)}"  # changed a second ago: maybe a writer on another host
    for file in (stale, live, fresh):
        file.write_bytes(b"partial")
    for file in (stale, live):
        os.utime(file, (time.time() - 3600, time.time() - 3600))
    monkeypatch.chdir(REPO)
    main(_short_fit_args(tiny_model_dir, tmp_path, steps=1), run=False)
    assert sorted(p.name for p in old_run.iterdir()) == sorted([live.name, fresh.name])
    assert f"removed the temporary checkpoint files of killed runs: {stale}" in capsys.readouterr().out
