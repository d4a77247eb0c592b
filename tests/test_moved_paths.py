"""Artefacts of the flat package still load (``lit_gcpo.moved``): a checkpoint whose pickle names an old module
path, a saved config naming old class paths, ``python -m`` on an old module; each old path warns once."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import subprocess
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_gcpo.moved import MOVED, MovedModuleWarning
from lit_gcpo.training.module import GRPOModule
from lit_gcpo.training.policy import LoraOptions

REPO = Path(__file__).parents[1]


def _pickling_module_as(module_path: str) -> types.SimpleNamespace:
    """A pickle module for ``torch.save`` whose pickler writes ``LoraOptions`` as ``module_path.LoraOptions``
    (the GLOBAL opcode, as a checkpoint saved before the move has it)."""

    class Pickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
        def save_global(self, obj, name=None):
            if obj is LoraOptions:
                self.write(pickle.GLOBAL + f"{module_path}\nLoraOptions\n".encode())
                self.memoize(obj)
                return
            super().save_global(obj, name)

    return types.SimpleNamespace(Pickler=Pickler, dump=pickle.dump, __name__="old_path_pickle")


def _forget(monkeypatch, old: str) -> None:
    """Import ``old`` afresh in this test (an earlier test may have imported it, and it warns only once)."""
    monkeypatch.delitem(sys.modules, old, raising=False)


@pytest.mark.parametrize("module_path", ["lit_gcpo.policy", "lit_gcpo.training.policy"])
def test_a_lora_checkpoint_loads_whichever_path_its_pickle_names(tiny_model_dir, tmp_path, module_path):
    pytest.importorskip("peft")
    lora = LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    saved = GRPOModule(model=tiny_model_dir, lora=lora, export_dir=None)
    torch.manual_seed(0)
    for name, parameter in saved.policy.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters values a wrong load would lose
            parameter.data.normal_()
    checkpoint = {
        "state_dict": saved.state_dict(),
        "hyper_parameters": dict(saved.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path, pickle_module=_pickling_module_as(module_path))
    with torch.serialization._open_zipfile_reader(str(path)) as archive:  # what the checkpoint names
        names = {record for record in archive.get_all_records() if record.endswith("data.pkl")}
        raw = b"".join(archive.get_record(record) for record in names)
    assert f"{module_path}\nLoraOptions".encode() in raw

    # Lightning's load: torch.load(weights_only=True), the default for a local file
    restored = GRPOModule.load_from_checkpoint(path, export_dir=None)
    assert type(restored.hparams.lora) is LoraOptions and restored.hparams.lora == lora
    for name, tensor in saved.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_the_full_unpickler_imports_an_old_path_with_one_warning(monkeypatch):
    _forget(monkeypatch, "lit_gcpo.policy")
    data = pickle.GLOBAL + b"lit_gcpo.policy\nLoraOptions\n" + pickle.STOP  # the class, by its old path
    with pytest.warns(MovedModuleWarning, match=r"lit_gcpo\.policy is now lit_gcpo\.training\.policy"):
        assert pickle.loads(data) is LoraOptions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pickle.loads(data) is LoraOptions
    assert not [w for w in caught if issubclass(w.category, MovedModuleWarning)]  # once per process


def test_every_old_path_forwards_to_the_module_it_moved_to(monkeypatch):
    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), f"{old} is a real file again"
        _forget(monkeypatch, old)
        with pytest.warns(MovedModuleWarning, match=new.replace(".", r"\.")):
            alias = importlib.import_module(old)
        target = importlib.import_module(new)
        public = [name for name in vars(target) if not name.startswith("__")]
        assert public and all(getattr(alias, name) is getattr(target, name) for name in public), old
    with pytest.raises(AttributeError):
        importlib.import_module("lit_gcpo.module").NoSuchThing  # noqa: B018


def _old_config(tmp_path: Path) -> Path:
    """The quickstart config as a run saved before the move would name its strategy and progress bar."""
    config = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    config["trainer"]["strategy"] = {"class_path": "lit_gcpo.parallel.FSDP2Strategy"}
    config["trainer"]["callbacks"].append({"class_path": "lit_gcpo.progress.StepProgressBar"})
    for key in ("default_root_dir",):
        config["trainer"][key] = str(tmp_path)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_saved_config_with_old_class_paths_prints_through_python_m_of_the_old_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lit_gcpo.cli", "fit", "--config", str(_old_config(tmp_path)), "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: lit_gcpo.parallel.FSDP2Strategy" in done.stdout  # jsonargparse prints the path as given
    for old, new in [
        ("lit_gcpo.cli", "lit_gcpo.running.cli"),
        ("lit_gcpo.parallel", "lit_gcpo.training.parallel"),
        ("lit_gcpo.progress", "lit_gcpo.running.progress"),
    ]:
        assert done.stderr.count(f"{old} is now {new}") == 1, (old, done.stderr[-2000:])


def test_a_saved_config_with_old_class_paths_instantiates_the_current_classes(tmp_path, monkeypatch):
    from lit_gcpo.running.cli import main
    from lit_gcpo.running.progress import StepProgressBar
    from lit_gcpo.training.parallel import FSDP2Strategy

    for old in ("lit_gcpo.parallel", "lit_gcpo.progress"):
        _forget(monkeypatch, old)
    with pytest.warns(MovedModuleWarning) as caught:
        cli = main(["--config", str(_old_config(tmp_path))], run=False)
    assert {str(w.message).split(" is now")[0] for w in caught if w.category is MovedModuleWarning} == {
        "lit_gcpo.parallel",
        "lit_gcpo.progress",
    }
    assert type(cli.trainer.strategy) is FSDP2Strategy
    assert sum(type(callback) is StepProgressBar for callback in cli.trainer.callbacks) == 1
