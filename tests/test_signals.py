"""SIGTERM (a preemption) stops a fit at a step boundary with a resumable checkpoint and exit status 143."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import _short_fit_args

from lit_gcpo.cli import main

REPO = Path(__file__).parents[1]


def test_sigterm_saves_a_checkpoint_exits_143_and_the_resume_continues_at_its_step(tiny_model_dir, tmp_path):
    args = _short_fit_args(tiny_model_dir, tmp_path, steps=200)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lit_gcpo.cli", "fit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.rglob("last.ckpt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # last.ckpt appears at the first validation (step 2): training is under way
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output[-3000:]
    stop = re.search(r"stopped by SIGTERM after step (\d+): checkpoint (\S+); resume with the same command", output)
    assert stop, output[-3000:]
    step, path = int(stop.group(1)), stop.group(2)
    checkpoint = torch.load(path, weights_only=True)
    assert 2 <= checkpoint["global_step"] == step < 200
    assert checkpoint["RolloutDataModule"]["consumed_batches"] == step  # a step boundary: no batch half done
    resumed = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=step + 2), "--ckpt_path", path])
    assert resumed.trainer.global_step == step + 2 and resumed.datamodule.consumed_batches == step + 2
    events = EventAccumulator(resumed.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [step, step + 1]  # nothing run twice
