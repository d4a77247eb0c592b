"""``lit-gcpo fit`` with the vllm engine: the quickstart runs, the weights reach vLLM after every optimizer
step (engine and trainer log-probs agree), and its rewards are comparable to the hf engine's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).parents[2]
STEPS = 8


def _fit(engine: str, out: Path) -> dict[str, list[float]]:
    args = [
        sys.executable,
        "-m",
        "lit_gcpo.running.cli",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--data.engine",
        engine,
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--data.batch_size",
        "16",
        "--model.export_dir",
        "null",
    ]
    if engine == "vllm":
        args += ["--data.engine_options", '{"dtype": "float32", "max_model_len": 256}']
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    subprocess.run(args, cwd=ROOT, env=env, check=True, timeout=900)
    events = next(out.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in tags}


def test_quickstart_with_vllm_syncs_every_step_and_matches_hf_rewards(tmp_path):
    with_vllm = _fit("vllm", tmp_path / "vllm")
    with_hf = _fit("hf", tmp_path / "hf")
    assert len(with_vllm["reward/mean"]) == STEPS
    # trainer and engine log-probs of the sampled tokens agree at every step: the policy's new weights were
    # loaded before each rollout (without the sync they drift apart as soon as the first step lands)
    assert max(with_vllm["train/mismatch_abs_max"]) < 1e-3
    assert "train/mismatch_abs_max" not in with_hf  # the hf engine samples from the policy itself
    mean_vllm = sum(with_vllm["reward/mean"]) / STEPS
    mean_hf = sum(with_hf["reward/mean"]) / STEPS
    assert abs(mean_vllm - mean_hf) < 0.15, (mean_vllm, mean_hf)
    assert mean_vllm > 0.1  # the warm-started policy solves some problems with either engine
