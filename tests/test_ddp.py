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
    _check_weights_over_both_ranks(rank0["first_batch"], rank1["first_batch"])


def _check_weights_over_both_ranks(first: dict, second: dict) -> None:
    """The callback's weights on each rank equal the pure functions applied to the two ranks' batches
    concatenated (centring, scale and normalisation are over the whole step, METHODS.md §5.1), and both
    ranks log the same weight spread (statistics over every rank's groups)."""
    from lit_gcpo.clustering import embedding_clusters
    from lit_gcpo.uncertainty import advantage_weights, uncertainty_signals

    offset = int(first["group_ids"].max()) + 1
    group_ids = torch.cat([first["group_ids"], second["group_ids"] + offset])  # [N0 + N1]
    embeddings = torch.cat([first["embeddings"], second["embeddings"]])
    num_groups = int(group_ids.max()) + 1
    signals, _ = uncertainty_signals(
        group_ids, num_groups, rewards=torch.cat([first["rewards"], second["rewards"]]),
        cluster_ids=embedding_clusters(embeddings, group_ids, 0.9), embeddings=embeddings,
        seq_logprobs=torch.cat([first["seq_logprobs"], second["seq_logprobs"]]),
    )  # fmt: skip
    weights, _ = advantage_weights("gcpo", signals)
    written = torch.cat([first["advantage_weights"], second["advantage_weights"]])
    torch.testing.assert_close(written, weights[group_ids], atol=1e-5, rtol=1e-5)
    assert weights.std() > 0  # the check is not vacuous: the groups got different weights
    assert first["weight_std"] == second["weight_std"]
