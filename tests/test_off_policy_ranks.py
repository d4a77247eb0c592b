"""One-step-off-policy rollouts on 2 gloo ranks (``tests/ddp_run.py``: 2 iterations per rollout, micro-batches of 5,
the second rollout's old log-probs poisoned on rank 1's half, so that its 2 steps are skipped on every rank).

Each rank's worker samples its shard of the next stream position with its own copy of the weights one rollout old,
so the two ranks' batches are the two halves of the batch one process with the global batch size samples (each
prompt from its position's seed), and the weights after 6 optimizer steps are that process's within the tolerance
of the other DDP tests. The checkpoint holds both ranks' in-flight batches; a resumed run continues bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from test_ddp import assert_same_weights, run

pytestmark = pytest.mark.slow

B = 6  # prompts per step over all ranks
OFF = {"off_policy": True}


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("off-policy-single")
    return run(tiny_model_dir, out, devices=1, batch_size=B, tag="single", **OFF)[0]


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("off-policy-ddp")
    return run(tiny_model_dir, out, devices=2, strategy="ddp", batch_size=B // 2, tag="ddp", **OFF)


def _same_batches(ranks: list[dict], single: dict) -> None:
    """Every rollout of the two ranks is the two halves of the single process's, sampled with the same weights."""
    assert len(ranks[0]["trained"]) == len(ranks[1]["trained"]) == len(single["trained"])
    for step, one in enumerate(single["trained"]):
        zero, first = ranks[0]["trained"][step], ranks[1]["trained"][step]
        assert len(zero["prompts"]) == len(first["prompts"]) == B // 2
        assert zero["prompts"] + first["prompts"] == one["prompts"], step
        assert zero["completions"] + first["completions"] == one["completions"], step
        for key in ("rollout/weight_version", "rollout/weight_lag"):
            assert zero["metrics"][key] == first["metrics"][key] == one["metrics"][key], (step, key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_sample_and_train_as_one_process(tiny_model_dir, tmp_path, single, ddp, strategy):
    """DDP, and FSDP2 (its engine copy is made before sharding; the weights are gathered once per step in the
    trainer thread): the same batches and the same weights as one process."""
    ranks = ddp if strategy == "ddp" else run(
        tiny_model_dir, tmp_path, devices=2, strategy=strategy, batch_size=B // 2, tag=strategy, **OFF
    )  # fmt: skip
    assert single["skipped"] == ranks[0]["skipped"] == ranks[1]["skipped"] == 2  # the poisoned rollout, both ranks
    assert single["global_step"] == ranks[0]["global_step"] == 6 and single["consumed"] == ranks[0]["consumed"] == 4
    _same_batches(ranks, single)
    lags = [t["metrics"]["rollout/weight_lag"] for t in single["trained"]]
    assert lags[0] == 0 and max(lags) == 2  # not vacuous: batches a rollout (2 optimizer steps) old were trained
    assert_same_weights(ranks[0], ranks[1], atol=0)
    assert_same_weights(single, ranks[0])
    assert ranks[0]["loss"] == pytest.approx(single["loss"], abs=1e-5)


def test_two_ranks_resume_with_both_in_flight_batches(tiny_model_dir, tmp_path, ddp):
    """Stopped after 4 optimizer steps, resumed to 6: the checkpoint (rank 0 writes it) holds each rank's in-flight
    batch, each rank restores its own, and the run equals the uninterrupted one bit for bit."""
    checkpoint = tmp_path / "off-policy-ranks.ckpt"
    common = dict(devices=2, strategy="ddp", batch_size=B // 2, **OFF)
    run(tiny_model_dir, tmp_path, max_steps=4, save=str(checkpoint), tag="first", **common)
    saved = torch.load(checkpoint, weights_only=True)["RolloutDataModule"]["off_policy_in_flight"]
    assert len(saved) == 2 and saved[0]["position"] == saved[1]["position"] == 3
    for rank, state in enumerate(saved):  # rollout 3, each rank's own half
        assert state["rollout"]["prompts"] == ddp[rank]["trained"][3]["prompts"]
    resumed = run(tiny_model_dir, tmp_path, resume=str(checkpoint), tag="resumed", **common)
    for rank in range(2):
        assert resumed[rank]["global_step"] == 6 and resumed[rank]["consumed"] == ddp[rank]["consumed"]
        ours, theirs = resumed[rank]["trained"], ddp[rank]["trained"][-len(resumed[rank]["trained"]) :]
        assert [t["prompts"] for t in ours] == [t["prompts"] for t in theirs]
        assert [t["completions"] for t in ours] == [t["completions"] for t in theirs]
        assert_same_weights(ddp[rank], resumed[rank], atol=0)
