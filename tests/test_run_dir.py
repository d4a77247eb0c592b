"""A run never writes into another run's directory: version directories are claimed atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main
from lit_gcpo.running.run_dir import CLAIM_FILE, RunDirectoryTakenError, claim_directory


def test_two_runs_set_up_at_once_get_two_version_directories(tiny_model_dir, tmp_path, monkeypatch):
    """Both runs are built before either writes anything: the window in which two fits started 0.2 s apart
    both chose version_0."""
    monkeypatch.chdir(Path(__file__).parents[1])
    first = main(_short_fit_args(tiny_model_dir, tmp_path, steps=1), run=False)
    second = main(_short_fit_args(tiny_model_dir, tmp_path, steps=1), run=False)
    assert Path(first.trainer.log_dir).name == "version_0"
    assert Path(second.trainer.log_dir).name == "version_1"
    claim = json.loads((Path(second.trainer.log_dir) / CLAIM_FILE).read_text())
    assert claim["pid"] == os.getpid()
    second.trainer.fit(second.model, datamodule=second.datamodule)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    for cli in (first, second):  # each run's files stay in its own directory
        log_dir = Path(cli.trainer.log_dir)
        assert (log_dir / "config.yaml").is_file() and (log_dir / "policy" / "model.safetensors").is_file()
        assert Path(cli.model.exported_to).parent == log_dir
        assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1


def test_a_fixed_version_that_holds_a_run_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=1), "--trainer.logger.init_args.version", "mine"]
    main(["fit", *args])
    config = next(tmp_path.rglob("mine/config.yaml"))
    before = config.read_bytes()
    with pytest.raises(RunDirectoryTakenError, match=r"mine.*already holds a run"):
        main(["fit", *args, "--model.beta", "0.1"])
    assert config.read_bytes() == before  # the first run's config was not replaced


def test_claim_is_exclusive_and_refuses_directories_of_older_runs(tmp_path):
    assert claim_directory(tmp_path / "a")
    assert not claim_directory(tmp_path / "a")  # a second claim of the same directory fails
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fit.log").write_text("a launcher's own log")  # not a run's file: may be claimed
    assert claim_directory(tmp_path / "b")
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)  # a run from before claims existed
    assert not claim_directory(tmp_path / "c")
    assert not (tmp_path / "c" / CLAIM_FILE).exists()


def test_a_logger_less_run_into_a_directory_that_holds_a_run_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=1), "--trainer.logger", "false"]
    main(args, run=False)
    assert (tmp_path / CLAIM_FILE).is_file()
    with pytest.raises(RunDirectoryTakenError, match=r"default_root_dir .* already holds a run"):
        main(args, run=False)


def test_two_fit_processes_started_0_2_s_apart_keep_their_own_directories(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    import time

    repo = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lit_gcpo.running.cli", "fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=2)]
    processes = []
    for _ in range(2):
        processes.append(subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        time.sleep(0.2)
    outputs = [process.communicate(timeout=600)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    versions = sorted(p.name for p in (tmp_path / "gcpo").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:
        log_dir = tmp_path / "gcpo" / version
        claim = json.loads((log_dir / CLAIM_FILE).read_text())
        assert claim["pid"] in {process.pid for process in processes}
        assert (log_dir / "config.yaml").is_file() and (log_dir / "policy" / "model.safetensors").is_file()
        assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
        assert {p.name for p in (log_dir / "checkpoints").iterdir()} >= {"last.ckpt"}
    claims = {json.loads((tmp_path / "gcpo" / v / CLAIM_FILE).read_text())["pid"] for v in versions}
    assert len(claims) == 2  # one run per directory


def test_a_run_that_fails_at_setup_gives_its_directory_back(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lit_gcpo.data.datamodule import RolloutDataModule

    monkeypatch.chdir(Path(__file__).parents[1])
    main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=1)])  # version_0: a run that wrote its files

    def unreadable(self, stage):
        raise RuntimeError("the data cannot be read")

    monkeypatch.setattr(RolloutDataModule, "setup", unreadable)
    with pytest.raises(RuntimeError, match="the data cannot be read"):
        main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=1)])
    assert sorted(p.name for p in (tmp_path / "gcpo").iterdir()) == ["version_0"]  # version_1 was given back
    assert f"released the run directory {tmp_path / 'gcpo' / 'version_1'}" in capsys.readouterr().out
    assert (tmp_path / "gcpo" / "version_0" / CLAIM_FILE).is_file()  # another run's directory is never released
