"""``lit-gcpo test --ckpt_path`` with the vllm engine evaluates the checkpoint: its greedy completions equal the
hf engine's on the same checkpoint and differ from the base model's (the engine is synced after the restore)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
SMALL = ["--data.val.init_args.num_val", "24", "--data.val_batch_size", "24", "--trainer.enable_progress_bar", "false"]
VLLM = ["--data.engine", "vllm", "--data.engine_options", '{"dtype": "float32", "max_model_len": 256}']


def _cli(subcommand: str, *args: str, capture: Path | None = None) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if capture is not None:
        env["CAPTURE_COMPLETIONS"] = str(capture)
    command = [
        sys.executable,
        "-m",
        "lit_gcpo.running.cli",
        subcommand,
        "--config",
        "configs/quickstart.yaml",
        *SMALL,
        *args,
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=900)


def _test(out: Path, name: str, *args: str) -> dict[str, list[str]]:
    capture = out / f"{name}.json"
    _cli(
        "test",
        "--trainer.default_root_dir",
        str(out / name),
        "--trainer.logger.init_args.save_dir",
        str(out / name),
        "--trainer.callbacks+=capture_completions.CaptureCompletions",
        *args,
        capture=capture,
    )
    return json.loads(capture.read_text())


def test_checkpoint_evaluation_with_vllm_evaluates_the_checkpoint(tmp_path):
    _cli(
        "fit",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path / "fit"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "fit"),
        "--model.optimizer.init_args.lr",
        "3e-3",
        "--model.export_dir",
        "null",
        "--data.batch_size",
        "8",
    )
    checkpoint = str(next((tmp_path / "fit").rglob("last.ckpt")))
    hf = _test(tmp_path, "hf", "--ckpt_path", checkpoint)
    vllm = _test(tmp_path, "vllm", "--ckpt_path", checkpoint, *VLLM)
    base = _test(tmp_path, "base", *VLLM)
    assert sum(map(len, hf.values())) == 24 and hf.keys() == vllm.keys() == base.keys()
    assert vllm == hf  # greedy: the same weights give the same completions in both engines
    assert sum(base[prompt] != hf[prompt] for prompt in hf) >= 1  # and they are the trained ones
