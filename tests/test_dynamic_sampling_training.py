"""Dynamic sampling through real fits (``tests/ddp_run.py``): what the module trains on, ``max_rounds``, the first
step against a plain loop over the stream with the real sampler, exact resume, and 2 gloo ranks against one
process (with the uncertainty callback, whose weights must be normalised over the trained groups of both ranks).

The reward (``toy_rewards:digit_fraction_for_odd_answers``) is 0 for every completion of a prompt whose gold answer
is even, so about half of the groups have no spread whatever the random policy samples; the others get the
fraction of digits of each completion, which differs between completions.
"""

from __future__ import annotations

import statistics
import zlib

import pytest
import torch
from test_ddp import assert_same_weights, run

pytestmark = pytest.mark.slow

B = 6  # prompts per step over all ranks
G = 4  # ddp_run's group size
DYNAMIC = {
    "rewards": ["toy_rewards:digit_fraction_for_odd_answers"],
    "dynamic": {"max_rounds": 8},
    "poison_rollout": None,
    "uncertainty": True,  # gcpo weights, normalised to mean 1 over the groups with spread
}
MIN_STD = 1e-6  # DynamicSampling's default


def _group_std(rewards: torch.Tensor) -> list[float]:
    return [statistics.pstdev(group.tolist()) for group in rewards.view(-1, G)]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory) -> dict:
    """One process, 6 optimizer steps (3 rollouts of 2 iterations), uninterrupted."""
    out = tmp_path_factory.mktemp("dynamic-straight")
    return run(tiny_model_dir, out, devices=1, batch_size=B, max_steps=6, tag="straight", **DYNAMIC)[0]


def test_no_group_without_reward_spread_reaches_the_loss(straight):
    assert straight["global_step"] == 6 and len(straight["trained"]) == 3
    dropped = 0
    for batch in straight["trained"]:
        assert len(batch["prompts"]) == B  # the batch was filled
        assert min(_group_std(batch["rewards"])) > MIN_STD
        metrics = batch["metrics"]
        assert metrics["rollout/groups_trained"] == B and metrics["rollout/groups_missing"] == 0
        assert metrics["rollout/prompts_sampled"] == B * metrics["rollout/rounds"]
        accounted = metrics["rollout/groups_dropped"] + metrics["rollout/groups_surplus"] + B
        assert accounted == metrics["rollout/prompts_sampled"]
        dropped += metrics["rollout/groups_dropped"]
    assert dropped > 0  # not vacuous: groups without spread were sampled and left out
    # the data position counts every batch drawn, not one per step
    assert straight["consumed"] == sum(batch["metrics"]["rollout/rounds"] for batch in straight["trained"]) > 3


def test_the_first_step_keeps_what_a_plain_loop_over_the_stream_keeps(tiny_model_dir, straight):
    """Positions 0, 1, 2, ... of the stream, each prompt's group sampled alone from its position's seed (README:
    crc32 of "seed/train/position") with the initial weights; the first 6 with spread are the first batch."""
    from lit_gcpo.data.rollout import RolloutCollector
    from lit_gcpo.data.streams import PromptStream
    from lit_gcpo.engines import build_engine
    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.rewards import RewardSet
    from lit_gcpo.tasks.arithmetic import ArithmeticTask
    from lit_gcpo.training.policy import load_policy, load_tokenizer

    rows = ArithmeticTask("train", num_train=64, num_val=8, seed=1).load()
    stream = PromptStream(rows, [row["prompt"] for row in rows], batch_size=1, seed=3, start=lambda: 0)
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    rewards = RewardSet.from_names(DYNAMIC["rewards"])
    collector = RolloutCollector(build_engine("hf", policy, tokenizer), tokenizer, rewards)
    kept_prompts, kept_completions, position = [], [], 0
    while len(kept_prompts) < B:
        prompt = stream.batch(position)  # position `position` of the stream, alone
        seed = zlib.crc32(f"3/train/{position}".encode())
        group = collector.collect(prompt, G, SamplingConfig(max_new_tokens=6), torch.device("cpu"), seeds=[seed])
        if statistics.pstdev(group.rewards.tolist()) > MIN_STD:
            kept_prompts += group.prompts
            kept_completions += group.completions
        position += 1
    first = straight["trained"][0]
    assert first["prompts"] == kept_prompts
    assert first["completions"] == kept_completions
    # the loop stopped inside round `rounds` of the run (rounds of B prompts)
    assert (position - 1) // B + 1 == first["metrics"]["rollout/rounds"]


def test_max_rounds_reached_trains_on_fewer_groups_and_logs_it(tiny_model_dir, tmp_path):
    options = {**DYNAMIC, "dynamic": {"max_rounds": 1}}
    result = run(tiny_model_dir, tmp_path, devices=1, batch_size=B, max_steps=4, tag="one-round", **options)[0]
    assert result["global_step"] == 4 and result["consumed"] == 2  # one batch per step
    sizes = []
    for batch in result["trained"]:
        metrics = batch["metrics"]
        sizes.append(len(batch["prompts"]))
        assert metrics["rollout/rounds"] == 1 and metrics["rollout/prompts_sampled"] == B
        assert metrics["rollout/groups_trained"] == sizes[-1] == B - metrics["rollout/groups_missing"]
        assert metrics["rollout/groups_dropped"] == B - sizes[-1]
        assert min(_group_std(batch["rewards"])) > MIN_STD
    assert min(sizes) < B  # the short batch happened


def test_a_resumed_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, straight):
    """Stopped after 4 optimizer steps (2 rollouts that drew several batches each), resumed to 6."""
    checkpoint = tmp_path / "mid.ckpt"
    common = dict(devices=1, batch_size=B, **DYNAMIC)
    first = run(tiny_model_dir, tmp_path, max_steps=4, save=str(checkpoint), tag="first", **common)[0]
    assert first["consumed"] > 2
    resumed = run(tiny_model_dir, tmp_path, max_steps=6, resume=str(checkpoint), tag="resumed", **common)[0]
    assert resumed["global_step"] == 6 and resumed["consumed"] == straight["consumed"]
    assert resumed["trained"][0]["prompts"] == straight["trained"][2]["prompts"]
    assert resumed["trained"][0]["completions"] == straight["trained"][2]["completions"]
    assert_same_weights(straight, resumed, atol=0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_fill_the_global_batch_as_one_process(tiny_model_dir, tmp_path, straight, strategy):
    """3 prompts per rank: the ranks draw alternate halves of each round, exchange what they kept and train on
    the first and second half of the single process's batch; the loss is normalised by the global counts, the
    advantage weights (gcpo) over both ranks' groups, so the weights after 6 steps are the single process's.
    Under ``fsdp2`` every forward pass is a collective: equal groups per rank keep the ranks in step."""
    options = dict(devices=2, strategy=strategy, batch_size=B // 2, max_steps=6, tag=strategy)
    rank0, rank1 = run(tiny_model_dir, tmp_path, **options, **DYNAMIC)
    assert rank0["consumed"] == rank1["consumed"] == straight["consumed"]
    for step, single in enumerate(straight["trained"]):
        zero, one = rank0["trained"][step], rank1["trained"][step]
        assert len(zero["prompts"]) == len(one["prompts"]) == B // 2
        assert zero["prompts"] + one["prompts"] == single["prompts"]
        assert zero["completions"] + one["completions"] == single["completions"]
        assert zero["metrics"]["rollout/groups_dropped"] == single["metrics"]["rollout/groups_dropped"]
        weights = torch.cat([zero["advantage_weights"], one["advantage_weights"]])  # [N]
        torch.testing.assert_close(weights, single["advantage_weights"], atol=1e-5, rtol=1e-5)
        # every trained group has spread, so the normalisation over groups with spread is over all of them
        assert weights.view(-1, G)[:, 0].mean().item() == pytest.approx(1.0, abs=1e-5)
        assert weights.std() > 0  # not vacuous: the groups got different weights
    assert_same_weights(rank0, rank1, atol=0)
    assert_same_weights(straight, rank0)
    assert rank0["loss"] == pytest.approx(straight["loss"], abs=1e-5)
