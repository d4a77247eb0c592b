"""vLLM with two data-parallel ranks: each rank's colocated engine (external_launcher) generates its own prompt
shard, and after every weight sync its log-probs equal that rank's trainer's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent


def test_two_ranks_generate_their_own_prompts_with_synced_engines(model_dir, tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(HERE / "ddp_vllm_run.py"), model_dir, str(tmp_path)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=1200,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert [s["step"] for s in rank0["steps"]] == [s["step"] for s in rank1["steps"]] == [0, 1, 2]
    for mine, theirs in zip(rank0["steps"], rank1["steps"], strict=True):
        assert not set(mine["prompts"]) & set(theirs["prompts"])  # each rank its own shard
        # the tolerance of the single-rank fit test: after every sync engine and trainer agree
        assert mine["gap"] < 1e-3 and theirs["gap"] < 1e-3
    for name, value in rank0["weights"].items():  # DDP kept the two policies equal, and they trained
        torch.testing.assert_close(rank1["weights"][name], value, atol=1e-6, rtol=0)
