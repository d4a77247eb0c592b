"""Dynamic sampling with one-step-off-policy rollouts: the rounds of a step run in the worker thread, with the weights
of the step before, over a gloo group of their own on several ranks.

One process (``tests/test_off_policy.py``'s ``fit``): every step's kept groups are those of a plain loop over the
stream from the step's first position, each prompt sampled alone from its position's seed with the weights that
sampled the step (recorded), and a resumed run equals the uninterrupted one. Two gloo ranks (``tests/ddp_run.py``,
with the uncertainty callback as in ``tests/test_dynamic_sampling_training.py``): the single process's batches and
weights, and an exact resume. The reward is 0 for every completion of a prompt whose gold answer is even, so about
half of the groups have no spread.
"""

from __future__ import annotations

import statistics
import zlib

import pytest
import torch
from test_ddp import assert_same_weights, run
from test_off_policy import SAMPLING, SEED, STEPS, B, G, _policy_with, _task, fit

from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.data.streams import PromptStream
from lit_gcpo.engines import build_engine
from lit_gcpo.rewards import RewardSet
from lit_gcpo.training.policy import load_tokenizer

pytestmark = pytest.mark.slow

ODD = ["toy_rewards:digit_fraction_for_odd_answers"]
DYNAMIC = {"rewards": ODD, "dynamic_sampling": {"max_rounds": 8}}
MIN_STD = 1e-6  # DynamicSampling's default
RANKS_B = 6  # prompts per step over all ranks, in tests/ddp_run.py runs
RANKS = {"rewards": ODD, "dynamic": {"max_rounds": 8}, "poison_rollout": None, "uncertainty": True, "off_policy": True}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    return fit(tiny_model_dir, tmp_path_factory.mktemp("off-policy-dynamic"), STEPS, data_options=DYNAMIC)


def _plain_loop(collector: RolloutCollector, stream: PromptStream, first: int) -> tuple[list, list, int]:
    """The first B groups with reward spread from stream position ``first`` on, each prompt sampled alone; the
    prompts, the completions and the position after the last prompt sampled."""
    prompts, completions, position = [], [], first
    while len(prompts) < B:
        seed = zlib.crc32(f"{SEED}/train/{position}".encode())  # README: crc32 of "seed/train/position"
        group = collector.collect(stream.batch(position), G, SAMPLING, torch.device("cpu"), seeds=[seed])
        if statistics.pstdev(group.rewards.tolist()) > MIN_STD:
            prompts += group.prompts
            completions += group.completions
        position += 1
    return prompts, completions, position


def test_every_step_keeps_what_a_plain_loop_keeps_with_the_weights_one_step_before(tiny_model_dir, straight):
    """Step t starts at the stream batch after step t-1's rounds; its groups are the plain loop's from there, with
    the weights of the step that sampled it (w_0 for steps 0 and 1, then w_{t-1})."""
    record, _ = straight
    rows = _task().load()
    stream = PromptStream(rows, [row["prompt"] for row in rows], batch_size=1, seed=SEED, start=lambda: 0)
    tokenizer, rewards = load_tokenizer(tiny_model_dir), RewardSet.from_names(ODD)
    versions = [int(step["batch"].metrics["rollout/weight_version"]) for step in record.steps]
    assert versions == [0, 0, 1, 2]
    start = 0  # in batches of B prompts
    for t, step in enumerate(record.steps):
        batch, rounds = step["batch"], int(step["batch"].metrics["rollout/rounds"])
        policy = _policy_with(tiny_model_dir, record.steps[versions[t]]["weights"])
        collector = RolloutCollector(build_engine("hf", policy, tokenizer), tokenizer, rewards)
        prompts, completions, after = _plain_loop(collector, stream, start * B)
        assert batch.prompts == prompts and batch.completions == completions, t
        assert (after - 1) // B == start + rounds - 1  # the loop stopped inside the step's last round
        start += rounds
    assert start > STEPS  # not vacuous: some step drew more than one batch


def test_a_resumed_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, straight):
    """Stopped after 2 steps: the in-flight rollout (rounds drawn in the worker) is saved with how many batches it
    drew; resumed to 4, the batches, losses and final weights are bit-equal."""
    record, module = straight
    checkpoint = str(tmp_path / "stopped.ckpt")
    fit(tiny_model_dir, tmp_path / "first", 2, save=checkpoint, data_options=DYNAMIC)
    (saved,) = torch.load(checkpoint, weights_only=True)["RolloutDataModule"]["off_policy_in_flight"]
    rounds = [int(step["batch"].metrics["rollout/rounds"]) for step in record.steps]
    assert saved["position"] == rounds[0] + rounds[1] and saved["drawn"] == rounds[2]
    resumed, resumed_module = fit(tiny_model_dir, tmp_path / "second", STEPS, ckpt=checkpoint, data_options=DYNAMIC)
    assert [s["step"] for s in resumed.steps] == [2, 3]
    for ours, theirs in zip(resumed.steps, record.steps[2:], strict=True):
        assert torch.equal(ours["batch"].input_ids, theirs["batch"].input_ids)
        assert ours["batch"].prompts == theirs["batch"].prompts
        assert ours["loss"] == theirs["loss"]
    for name, value in module.policy.state_dict().items():
        assert torch.equal(resumed_module.policy.state_dict()[name], value), name


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("off-policy-dynamic-single")
    return run(tiny_model_dir, out, devices=1, batch_size=RANKS_B, max_steps=6, tag="single", **RANKS)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_fill_the_global_batch_as_one_process(tiny_model_dir, tmp_path, single, strategy):
    """3 prompts per rank: each rank's worker draws its half of every round and the workers exchange over their
    own group; the kept groups, the advantage weights (gcpo, over both ranks) and the weights after 6 steps are the
    single process's."""
    options = dict(devices=2, strategy=strategy, batch_size=RANKS_B // 2, max_steps=6, tag=strategy)
    rank0, rank1 = run(tiny_model_dir, tmp_path, **options, **RANKS)
    assert rank0["consumed"] == rank1["consumed"] == single["consumed"] > len(single["trained"]) + 1
    for step, one in enumerate(single["trained"]):
        zero, first = rank0["trained"][step], rank1["trained"][step]
        assert zero["prompts"] + first["prompts"] == one["prompts"], step
        assert zero["completions"] + first["completions"] == one["completions"], step
        assert zero["metrics"]["rollout/weight_version"] == one["metrics"]["rollout/weight_version"]
        assert zero["metrics"]["rollout/groups_dropped"] == one["metrics"]["rollout/groups_dropped"]
        weights = torch.cat([zero["advantage_weights"], first["advantage_weights"]])  # [N]
        torch.testing.assert_close(weights, one["advantage_weights"], atol=1e-5, rtol=1e-5)
    assert max(t["metrics"]["rollout/weight_lag"] for t in single["trained"]) > 0
    assert_same_weights(rank0, rank1, atol=0)
    assert_same_weights(single, rank0)


def test_two_ranks_resume_exactly(tiny_model_dir, tmp_path):
    """DDP, stopped after 4 optimizer steps (2 rollouts), resumed to 6: bit-equal to the uninterrupted 2-rank run."""
    common = dict(devices=2, strategy="ddp", batch_size=RANKS_B // 2, **RANKS)
    straight = run(tiny_model_dir, tmp_path, max_steps=6, tag="straight", **common)
    checkpoint = tmp_path / "mid.ckpt"
    run(tiny_model_dir, tmp_path, max_steps=4, save=str(checkpoint), tag="first", **common)
    resumed = run(tiny_model_dir, tmp_path, max_steps=6, resume=str(checkpoint), tag="resumed", **common)
    for rank in range(2):
        assert resumed[rank]["consumed"] == straight[rank]["consumed"]
        assert resumed[rank]["trained"][0]["prompts"] == straight[rank]["trained"][2]["prompts"]
        assert resumed[rank]["trained"][0]["completions"] == straight[rank]["trained"][2]["completions"]
        assert_same_weights(straight[rank], resumed[rank], atol=0)
