"""Sharded checkpoints are read without running code from them: a crafted ``.metadata``, shard item or
``meta.pt`` is refused, naming the file, and the code it holds never runs; a real one loads as before."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lit_gcpo.running.cli import main
from lit_gcpo.running.sharded_checkpoint import (
    UnsafeCheckpointError,
    load_sharded,
    read_metadata,
    read_sharded_checkpoint,
)

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class ShellPayload:
    """Unpickles into ``os.system("touch <marker>")``: the file appears only if the unpickler ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class MethodPayload:
    """Unpickles into ``Path(marker).touch()``: a method of a class that ``.metadata`` may name (pathlib)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def _save_sharded(directory: Path, optimizer_state: dict | None = None, meta: dict | None = None) -> None:
    """The layout Lightning's ModelParallelStrategy writes: ``state_dict`` and ``optimizer_0`` through
    torch.distributed.checkpoint, the rest in ``meta.pt``."""
    model, optimizer = _trained()
    state = {
        "state_dict": get_model_state_dict(model),
        "optimizer_0": optimizer_state or get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save(meta or {"global_step": 1, "hyper_parameters": {"beta": 0.0}}, directory / "meta.pt")


def test_a_real_sharded_checkpoint_loads_through_the_safe_reader(tmp_path):
    _save_sharded(tmp_path)
    saved_model, saved_optimizer = _trained()
    model, optimizer = _trained(seed=1)  # other weights and momentum, to be overwritten
    weights = {"state_dict": get_model_state_dict(model)}
    load_sharded(weights, tmp_path, no_dist=True)
    model.load_state_dict(weights["state_dict"])
    state = {"optimizer_0": get_optimizer_state_dict(model, optimizer)}
    load_sharded(state, tmp_path, no_dist=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer_0"])
    torch.testing.assert_close(model.weight, saved_model.weight, rtol=0, atol=0)
    for mine, saved in zip(optimizer.state.values(), saved_optimizer.state.values(), strict=True):
        torch.testing.assert_close(mine["momentum_buffer"], saved["momentum_buffer"], rtol=0, atol=0)
    checkpoint = read_sharded_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 1 and checkpoint["hyper_parameters"] == {"beta": 0.0}
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["params"]) == (0.1, 0.5, ["weight", "bias"])


@pytest.mark.parametrize("payload", [ShellPayload, MethodPayload])
def test_a_crafted_metadata_file_is_refused_and_its_code_never_runs(tmp_path, payload):
    checkpoint, marker = tmp_path / "step1.ckpt", tmp_path / "pwned"
    _save_sharded(checkpoint)
    metadata = read_metadata(checkpoint / ".metadata")
    metadata.planner_data = payload(marker)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    dcp.FileSystemReader(checkpoint).read_metadata()  # PyTorch's own reader runs the payload:
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"step1\.ckpt/\.metadata: refused"):
        read_sharded_checkpoint(checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"step1\.ckpt/\.metadata: refused"):  # the strategy's path
        load_sharded({"state_dict": get_model_state_dict(torch.nn.Linear(3, 2))}, checkpoint, no_dist=True)
    assert not marker.exists()


def test_a_crafted_shard_item_is_refused_and_its_code_never_runs(tmp_path):
    checkpoint, marker = tmp_path / "step1.ckpt", tmp_path / "pwned"
    _save_sharded(checkpoint, optimizer_state={"state": {}, "param_groups": [{"lr": ShellPayload(marker)}]})
    dcp.load({"optimizer_0": {"param_groups": [{"lr": None}]}}, checkpoint_id=checkpoint, no_dist=True)
    assert marker.exists()  # PyTorch's own loader ran it
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"step1\.ckpt: refused, its shard item 'optimizer_0\.param_gr"):
        read_sharded_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_crafted_meta_file_is_refused_and_its_code_never_runs(tmp_path):
    checkpoint, marker = tmp_path / "step1.ckpt", tmp_path / "pwned"
    _save_sharded(checkpoint, meta={"global_step": 1, "hyper_parameters": ShellPayload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"step1\.ckpt/meta\.pt: refused"):
        read_sharded_checkpoint(checkpoint)
    assert not marker.exists()
    torch.load(checkpoint / "meta.pt", weights_only=False)  # the payload is real
    assert marker.exists()


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_the_cli_refuses_a_crafted_sharded_checkpoint_before_loading_anything(tmp_path, monkeypatch, subcommand):
    monkeypatch.chdir(REPO)
    checkpoint, marker = tmp_path / "last.ckpt", tmp_path / "pwned"
    _save_sharded(checkpoint)
    metadata = read_metadata(checkpoint / ".metadata")
    metadata.planner_data = ShellPayload(marker)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    args = [subcommand, "--config", "configs/quickstart.yaml", "--trainer.strategy", "fsdp2"]
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt/\.metadata: refused"):
        main([*args, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(checkpoint)])
    assert not marker.exists()
