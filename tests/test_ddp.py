"""DDP on the CPU: two processes with their own prompts end with identical weights (gradients are synced),
with several optimizer iterations and micro-batches per rollout batch and the uncertainty callback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

HERE = Path(__file__).parent


def test_two_ranks_stay_in_sync(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, str(HERE / "ddp_run.py"), tiny_model_dir, str(tmp_path)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] == 4  # 2 rollouts x 2 iterations
    assert rank0["consumed"] == rank1["consumed"] == 2
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], value, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.allclose(value, initial[name].detach()) for name, value in rank0["weights"].items())
