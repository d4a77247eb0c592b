"""Dynamic sampling (``lit_gcpo.data.dynamic_sampling``): the spread test, the fill plan and the filling loop against
plain loops over the stream, on one process and on simulated ranks (threads exchanging through a barrier); the
group selection against the collector's own packing."""

from __future__ import annotations

import random
import statistics
import threading

import pytest
import torch

from lit_gcpo.data.batch import PromptBatch, RolloutBatch
from lit_gcpo.data.dynamic_sampling import (
    DynamicSampling,
    TorchExchange,
    fill_plan,
    fill_rollout,
    groups_with_spread,
    merge_round_metrics,
    stream_rollout,
)
from lit_gcpo.data.group_selection import concat_groups, select_groups
from lit_gcpo.data.rollout import pack_sequences
from lit_gcpo.data.streams import PromptStream

PAD = 0
G = 4


def test_groups_with_spread_hand_derived():
    nan = float("nan")
    rewards = torch.tensor(
        [
            *[1.0, 1.0, 1.0, 1.0],  # all right: std 0
            *[0.0, 1.0, 0.0, 0.0],  # mean 1/4, variance (3 (1/4)^2 + (3/4)^2) / 4 = 3/16, std 0.4330
            *[0.25, 0.25, 0.25, 0.25 + 2**-22],  # d = 2^-22 (float32-exact): variance 3 d^2 / 16, std 1.03e-7
            *[nan, 1.0, nan, nan],  # one finite reward: no spread
            *[nan, 0.0, 1.0, nan],  # finite 0 and 1: std 1/2
        ]
    )
    group_ids = torch.arange(5).repeat_interleave(4)
    keep, metrics = groups_with_spread(rewards, group_ids, 5, 1e-6)
    assert keep.tolist() == [False, True, False, False, True]
    torch.testing.assert_close(metrics["std"][[0, 1, 3, 4]], torch.tensor([0.0, 0.75**0.5 / 2, 0.0, 0.5]).double())
    assert metrics["std"][2] == pytest.approx(2**-22 * 3**0.5 / 4, rel=1e-9)
    assert groups_with_spread(rewards, group_ids, 5, 0.0)[0].tolist() == [False, True, True, False, True]


def test_groups_with_spread_equals_a_loop_with_statistics_pstdev():
    generator = random.Random(0)
    for _ in range(20):
        sizes = [generator.randint(1, 6) for _ in range(generator.randint(1, 8))]
        values = [[generator.choice([0.0, 0.5, 1.0, float("nan")]) for _ in range(size)] for size in sizes]
        rewards = torch.tensor([v for group in values for v in group])
        group_ids = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
        keep, _ = groups_with_spread(rewards, group_ids, len(sizes), 1e-6)
        finite = [[v for v in group if v == v] for group in values]
        expected = [len(f) >= 2 and statistics.pstdev(f) > 1e-6 for f in finite]
        assert keep.tolist() == expected


def test_fill_plan_takes_the_first_groups_in_stream_order():
    # 2 ranks, target 4: round 0 gives 1 + 2, round 1 gives 2 + 2: the 4th group is rank 0's first of round 1
    plan = fill_plan([[1, 2], [2, 2]], target=4)
    assert plan.taken == [[1, 2], [1, 0]] and plan.trained == 4 and plan.available == 7
    # short after the last round: 5 available on 2 ranks, 6 wanted: 4 trained (a multiple of the ranks)
    plan = fill_plan([[3, 0], [0, 2]], target=6)
    assert plan.taken == [[3, 0], [0, 1]] and plan.trained == 4
    assert fill_plan([[0, 1]], target=2).trained == 0


# ------------------------------------------------------------------------------------------------ a fake collector
def _group_rewards(position: int) -> list[float]:
    """The rewards of the group of stream position ``position``: all equal for about half of the positions (some
    failed, NaN), 0/1 spread for the others, float noise for a few."""
    generator = random.Random(position)
    kind = generator.random()
    if kind < 0.45:
        value = generator.choice([0.0, 1.0])
        return [value if generator.random() > 0.1 else float("nan") for _ in range(G)]
    if kind < 0.55:
        return [0.7, 0.7, 0.7, 0.7 + 1e-9]
    return [float(generator.random() < 0.5) for _ in range(G - 1)] + [float(generator.random() < 0.5) + 0.25]


def _fake_collect(prompts: PromptBatch) -> RolloutBatch:
    """A RolloutBatch of ``prompts`` whose token lengths and rewards follow each prompt's stream position, packed
    as the collector packs (``pack_sequences``)."""
    prompt_ids, completion_ids, rewards = [], [], []
    for position in prompts.positions:
        generator = random.Random(10_000 + position)
        prompt = [1 + position % 50] * generator.randint(1, 7)
        for j in range(G):
            prompt_ids.append(prompt)
            completion_ids.append([2 + j] * generator.randint(0, 5))
        rewards += _group_rewards(position)
    input_ids, attention_mask, completion_mask = pack_sequences(prompt_ids, completion_ids, PAD, torch.device("cpu"))
    n = len(completion_ids)
    return RolloutBatch(
        prompts=list(prompts.prompts),
        rows=[{"position": p} for p in prompts.positions],
        completions=[f"c{p}/{j}" for p in prompts.positions for j in range(G)],
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        group_ids=torch.arange(len(prompts)).repeat_interleave(G),
        rewards=torch.tensor(rewards),
        reward_components={"total": torch.tensor(rewards)},
        truncated=torch.zeros(n, dtype=torch.bool),
        engine_logprobs=-completion_mask.clone(),
        metrics={"time/generate_s": 1.0, "completion/length_max": float(completion_mask.sum(-1).max())},
    )


def _reference(batch_size: int, world: int, max_rounds: int, min_std: float, start: int) -> tuple[list[int], int]:
    """The plain loop: positions from ``start`` in order, a round of ``batch_size x world`` at a time, until the
    kept ones reach the target or ``max_rounds``; the first target kept (short: a multiple of ``world``)."""
    kept, position, target = [], start, batch_size * world
    for _ in range(max_rounds):
        for _ in range(target):
            finite = [r for r in _group_rewards(position) if r == r]
            if len(finite) >= 2 and statistics.pstdev(finite) > min_std:
                kept.append(position)
            position += 1
        if len(kept) >= target:
            break
    count = target if len(kept) >= target else len(kept) - len(kept) % world
    return kept[:count], position


class _ThreadExchange:
    """``RankExchange`` for ranks that are threads of one process."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, shared["world"], shared

    def all_gather(self, value):
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        gathered = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return gathered


def _run_ranks(world: int, steps: int, batch_size: int, settings: DynamicSampling) -> list[list[RolloutBatch]]:
    """``steps`` fills on ``world`` simulated ranks, each drawing from its own shard of one stream."""
    rows = [{"i": i} for i in range(23)]
    shared = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world)}
    results: list[list[RolloutBatch]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        stream = PromptStream(rows, [f"p{i}" for i in range(23)], batch_size, seed=4, start=lambda: 0)
        stream.rank, stream.world_size = rank, world
        position, exchange = 0, _ThreadExchange(rank, shared)
        try:
            for _ in range(steps):  # each step from the batch after the last step's rounds
                args = (_fake_collect, stream.batch, settings, batch_size, exchange, PAD)
                batch, drawn = stream_rollout(position, *args)
                assert drawn == batch.metrics["rollout/rounds"]
                results[rank].append(batch)
                position += drawn
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(("world", "batch_size", "max_rounds"), [(1, 6, 8), (2, 3, 8), (3, 2, 8), (2, 5, 2), (1, 4, 1)])
def test_the_kept_groups_are_those_a_plain_loop_over_the_stream_keeps(world, batch_size, max_rounds):
    settings = DynamicSampling(max_rounds=max_rounds)
    results = _run_ranks(world, steps=4, batch_size=batch_size, settings=settings)
    position = 0
    short_steps = 0
    for step in range(4):
        expected, position = _reference(batch_size, world, max_rounds, settings.min_reward_std, position)
        batches = [results[rank][step] for rank in range(world)]
        got = [row["position"] for batch in batches for row in batch.rows]
        assert got == expected
        assert len({batch.num_groups for batch in batches}) == 1  # every rank the same number of groups
        metrics = batches[0].metrics
        assert metrics["rollout/groups_trained"] == len(expected)
        assert metrics["rollout/groups_missing"] == batch_size * world - len(expected)
        assert metrics["rollout/prompts_sampled"] == metrics["rollout/rounds"] * batch_size * world
        for key in ("rounds", "prompts_sampled", "groups_dropped", "groups_surplus", "groups_trained"):
            assert {batch.metrics[f"rollout/{key}"] for batch in batches} == {metrics[f"rollout/{key}"]}  # global
        short_steps += len(expected) < batch_size * world
        for batch in batches:  # each group is the fake collector's group of its position, repacked
            for index, row in enumerate(batch.rows):
                alone = _fake_collect(PromptBatch([f"p{row['position']}"], [row], [0], [row["position"]]))
                mine = select_groups(batch, [index])
                assert torch.equal(mine.rewards.nan_to_num(-1), alone.rewards.nan_to_num(-1))
                assert mine.completions == alone.completions
                assert torch.equal(concat_groups([mine], PAD).input_ids, alone.input_ids)
    assert (short_steps > 0) == (max_rounds <= 2)  # the short case is exercised where it should be


def test_without_dynamic_sampling_a_step_is_the_one_batch_at_its_position():
    stream = PromptStream([{"i": i} for i in range(23)], [f"p{i}" for i in range(23)], 3, seed=4, start=lambda: 0)
    batch, drawn = stream_rollout(5, _fake_collect, stream.batch, None, 3, TorchExchange(), PAD)
    assert drawn == 1 and [row["position"] for row in batch.rows] == [15, 16, 17]  # batch 5 of 3 prompts


def test_one_process_exchange_gathers_itself():
    assert TorchExchange().all_gather({"a": 1}) == [{"a": 1}]


def test_nothing_to_train_on_is_an_error_naming_the_setting():
    def draw() -> RolloutBatch:
        batch = _fake_collect(PromptBatch(["p"], [{}], [0], [0]))
        batch.rewards = torch.zeros_like(batch.rewards)
        return batch

    with pytest.raises(RuntimeError, match=r"3 rounds \(data.dynamic_sampling.max_rounds\) of 3 prompts gave 0 groups"):
        fill_rollout(draw, DynamicSampling(max_rounds=3), 1, TorchExchange(), PAD)


def test_the_named_reward_must_have_spread_too():
    """Total rewards with spread, an accuracy component without: kept on the total alone, dropped when the
    accuracy is named (DAPO's filter on accuracy)."""

    def draw() -> RolloutBatch:
        batch = _fake_collect(PromptBatch(["p", "q"], [{}, {}], [0, 1], [60, 61]))
        batch.rewards = torch.tensor([0.0, 0.1, 0.2, 0.3] * 2)
        batch.reward_components = {"accuracy": torch.tensor([0.0] * 4 + [0.0, 1.0, 0.0, 0.0])}
        return batch

    assert fill_rollout(draw, DynamicSampling(), 2, TorchExchange(), PAD).num_groups == 2
    on_accuracy = DynamicSampling(max_rounds=1, reward="accuracy")
    assert fill_rollout(draw, on_accuracy, 2, TorchExchange(), PAD).prompts == ["q"]


def test_concat_of_selected_groups_equals_the_collectors_packing_of_those_rows():
    a = _fake_collect(PromptBatch(["a0", "a1", "a2"], [{}] * 3, [0, 1, 2], [3, 8, 11]))
    b = _fake_collect(PromptBatch(["b0", "b1"], [{}] * 2, [0, 1], [5, 20]))
    joined = concat_groups([select_groups(a, [2, 0]), select_groups(b, [1])], PAD)
    direct = _fake_collect(PromptBatch(["a2", "a0", "b1"], [{}] * 3, [0, 1, 2], [11, 3, 20]))
    for name in ("input_ids", "attention_mask", "completion_mask", "group_ids", "engine_logprobs", "truncated"):
        assert torch.equal(getattr(joined, name), getattr(direct, name)), name
    assert joined.prompts == ["a2", "a0", "b1"] and joined.completions == direct.completions
    with pytest.raises(ValueError, match="different temperature"):
        concat_groups([a, RolloutBatch(**{**a.__dict__, "temperature": 0.5})], PAD)


def test_round_metrics_sum_timings_and_counts_and_average_the_rest():
    rounds = [
        {"time/generate_s": 2.0, "rollout/tokens_per_s": 50.0, "reward/x_invalid": 1.0, "completion/length_max": 3.0,
         "completion/truncated_frac": 0.5},
        {"time/generate_s": 1.0, "rollout/tokens_per_s": 200.0, "reward/x_invalid": 0.0, "completion/length_max": 5.0,
         "completion/truncated_frac": 0.0},
    ]  # fmt: skip
    merged = merge_round_metrics(rounds)
    # tokens: 2 s x 50 + 1 s x 200 = 300 in 3 s
    assert merged == {
        "time/generate_s": 3.0,
        "rollout/tokens_per_s": 100.0,
        "reward/x_invalid": 1.0,
        "completion/length_max": 5.0,
        "completion/truncated_frac": 0.25,
    }


def test_invalid_settings_name_the_option():
    with pytest.raises(ValueError, match=r"dynamic_sampling\.max_rounds must be >= 1"):
        DynamicSampling(max_rounds=0)
    with pytest.raises(ValueError, match=r"dynamic_sampling\.min_reward_std must be >= 0"):
        DynamicSampling(min_reward_std=-1.0)
    from lit_gcpo.data.datamodule import RolloutDataModule

    with pytest.raises(ValueError, match=r"dynamic_sampling\.reward 'acc' is not one of rewards"):
        RolloutDataModule(rewards=["math_accuracy"], dynamic_sampling={"reward": "acc"})


def test_the_cli_parses_the_typed_option_documents_it_and_refuses_bad_values(monkeypatch, capsys):
    from pathlib import Path

    from lit_gcpo.running.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    config = ["fit", "--config", "configs/quickstart.yaml"]
    cli = main([*config[1:], "--data.dynamic_sampling.max_rounds", "3"], run=False)  # run=False: no subcommand
    assert cli.datamodule.dynamic_sampling == DynamicSampling(max_rounds=3, min_reward_std=1e-6, reward=None)
    assert main(config[1:], run=False).datamodule.dynamic_sampling is None  # off by default
    for option, value in [("max_rounds", "0"), ("min_reward_std", "-1")]:
        with pytest.raises(SystemExit):
            main([*config, f"--data.dynamic_sampling.{option}", value])
        err = capsys.readouterr().err
        assert "data.dynamic_sampling" in err and option in err
    with pytest.raises(SystemExit):
        main([*config, "--data.dynamic_sampling.help", "DynamicSampling"])
    assert "at most this many batches of prompts per training step" in capsys.readouterr().out


def test_a_resume_that_turns_dynamic_sampling_on_off_or_changes_it_is_printed():
    from lit_gcpo.data.datamodule import RolloutDataModule
    from lit_gcpo.running.resume import compare_with_checkpoint

    saved = RolloutDataModule(dynamic_sampling=DynamicSampling(max_rounds=8)).state_dict()
    assert saved["dynamic_sampling"] == {"max_rounds": 8, "min_reward_std": 1e-6, "reward": None}
    checkpoint = {"RolloutDataModule": saved}
    same = {"data": {"dynamic_sampling": {"max_rounds": 8, "min_reward_std": 1e-6, "reward": None}}}
    assert compare_with_checkpoint(checkpoint, same) == ([], [])
    fewer = {"data": {"dynamic_sampling": {"max_rounds": 2, "min_reward_std": 1e-6, "reward": None}}}
    assert compare_with_checkpoint(checkpoint, fewer)[1] == [
        "data.dynamic_sampling: {'max_rounds': 2, 'min_reward_std': 1e-06, 'reward': None} (the checkpoint has "
        "{'max_rounds': 8, 'min_reward_std': 1e-06, 'reward': None})"
    ]
    off = compare_with_checkpoint(checkpoint, {"data": {"dynamic_sampling": None}})[1]
    assert off == [
        "data.dynamic_sampling: None (the checkpoint has {'max_rounds': 8, 'min_reward_std': 1e-06, 'reward': None})"
    ]
    assert compare_with_checkpoint({"RolloutDataModule": {}}, {"data": {"dynamic_sampling": None}}) == ([], [])


def test_the_stream_gives_any_batch_by_index():
    """Dynamic sampling reads batches by index, out of step with the dataloader's iterator and across epochs (7
    rows, batches of 3: batches 2 and 4 span two epochs). Expected: position p is row order_e[p mod 7] of epoch
    e = p // 7, order_e the permutation seeded by seed * 100003 + e (the stream's documented order)."""
    rows = [{"i": i} for i in range(7)]
    stream = PromptStream(rows, [f"p{i}" for i in range(7)], batch_size=3, seed=2, start=lambda: 0)

    def row_at(position: int) -> int:
        generator = torch.Generator().manual_seed(2 * 100_003 + position // 7)
        return torch.randperm(7, generator=generator).tolist()[position % 7]

    for index in [9, 2, 11, 0, 4, 4, 7, 1, 30]:
        batch = stream.batch(index)
        assert batch.positions == list(range(3 * index, 3 * index + 3))
        assert batch.indices == [row_at(p) for p in batch.positions]
    iterator = iter(stream)
    assert [next(iterator).indices for _ in range(5)] == [stream.batch(i).indices for i in range(5)]
