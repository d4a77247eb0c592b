"""Rewards that hang, return unusable values or never work: stopped, counted, and never silent."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import pytest
import torch
from test_cli import _short_fit_args

from lit_gcpo.rewards import RewardSet, RewardTerm
from lit_gcpo.rewards.combine import RewardError
from lit_gcpo.rewards.isolated import ProcessReward


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_runaway_user_reward_is_killed_restarted_and_counted(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rewards = RewardSet.from_names(["unusable_rewards:length_or_spin", "format"], timeout=0.5)
    term = rewards.terms[0]
    assert rewards.score(["p"] * 2, ["ab", "abcd"], [{}] * 2).components[term.name].tolist() == [2.0, 4.0]
    first_pid = getattr(getattr(term.fn, "child", None), "pid", None)
    scores = rewards.score(["p"] * 2, ["spin", "\\boxed{1}"], [{}] * 2)
    assert torch.isnan(scores.components[term.name]).all()
    assert scores.components["format"].tolist() == [0.0, 1.0]  # the other reward still scored
    assert scores.metrics[f"reward/{term.name}_timeouts"] == 1.0 and rewards.timeouts[term.name] == 1
    assert scores.metrics[f"reward/{term.name}_failures"] == 2.0
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.2  # nothing of it runs in this process (a stuck thread would) ...
    assert isinstance(term.fn, ProcessReward) and not _alive(first_pid)  # ... its process was killed
    # a fresh process serves the next batch
    assert rewards.score(["p"], ["abc"], [{}]).components[term.name].tolist() == [3.0]
    assert term.fn.child.pid != first_pid


@pytest.mark.parametrize(
    ("trigger", "cause"),
    [
        ("exit", "its process exited with code 3 during the call"),
        ("oom", "its process was killed by signal 9 (SIGKILL: what the kernel's out-of-memory killer sends)"),
    ],
)
def test_a_user_reward_whose_process_dies_is_reported_with_its_exit_not_as_a_timeout(
    trigger: str, cause: str, monkeypatch, caplog
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    name = "unusable_rewards:exit_or_length"
    rewards = RewardSet.from_names([name], timeout=3.0)
    assert rewards.score(["p"], ["ab"], [{}]).components[name].tolist() == [2.0]
    first_pid = rewards.terms[0].fn.child.pid
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        scores = rewards.score(["p"] * 2, [trigger, "abc"], [{}] * 2)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0  # at the death (plus the wait for its status), not at the 3 s timeout
    assert f"reward '{name}' failed on a batch of 2 completions: crashed: {cause}" in caplog.text
    assert "timed out" not in caplog.text
    assert torch.isnan(scores.components[name]).all()
    assert scores.metrics[f"reward/{name}_failures"] == 2.0 and scores.metrics[f"reward/{name}_timeouts"] == 0.0
    assert rewards.timeouts[name] == 0
    # a fresh process serves the next batch
    assert rewards.score(["p"], ["abcd"], [{}]).components[name].tolist() == [4.0]
    assert rewards.terms[0].fn.child.pid != first_pid and not _alive(first_pid)


def test_non_numeric_scores_are_an_error_naming_the_function_and_the_value():
    def strings(prompts, completions, **columns):
        return ["0.5"] * len(completions)

    rewards = RewardSet([RewardTerm("my_reward", strings)])
    with pytest.raises(RewardError, match=r"'my_reward' returned a str \('0\.5'\) for completion 0"):
        rewards.score(["p"], ["a"], [{}])


def test_nan_inf_and_huge_scores_are_counted_logged_and_not_used(caplog):
    def unusable(prompts, completions, **columns):
        return [1.0, math.nan, math.inf, 1e38, None]

    rewards = RewardSet([RewardTerm("bad", unusable), RewardTerm("one", lambda p, c, **k: [1.0] * len(c))])
    with caplog.at_level(logging.WARNING):
        scores = rewards.score(["p"] * 5, ["a"] * 5, [{}] * 5)
    component = scores.components["bad"]
    assert component[0].item() == 1.0 and torch.isnan(component[1:]).all()
    assert scores.metrics["reward/bad_invalid"] == 3.0 and scores.metrics["reward/bad_none"] == 1.0
    assert scores.metrics["reward/bad_failures"] == 0.0
    # total = bad + one where bad has a usable score: [2, 1, 1, 1, 1] (1e38 would have made the group std inf)
    torch.testing.assert_close(scores.total, torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]))
    assert "reward 'bad': 3 of 5 scores unusable" in caplog.text and "e.g. nan for completion 1" in caplog.text


def test_a_reward_without_a_usable_score_batch_after_batch_stops_the_run():
    calls = {"n": 0}

    def flaky(prompts, completions, **columns):
        calls["n"] += 1
        if calls["n"] == 2:
            return [1.0] * len(completions)  # one usable batch resets the count
        raise ConnectionError("grader down")

    rewards = RewardSet([RewardTerm("flaky", flaky), RewardTerm("nan", lambda p, c, **k: [math.nan] * len(c))], 1.0, 3)
    with pytest.raises(RewardError, match=r"'nan' gave no usable score in 3 batches in a row \(last: 1 of 1 scores"):
        for _ in range(3):
            rewards.score(["p"], ["a"], [{}])
    rewards = RewardSet([RewardTerm("flaky", flaky)], max_unusable_batches=3)
    calls["n"] = 0
    for _ in range(4):  # calls 1, 3, 4 fail; call 2 scores
        rewards.score(["p"], ["a"], [{}])
    with pytest.raises(
        RewardError,
        match=r"'flaky' gave no usable score in 3 batches in a row \(last: raised ConnectionError: grader down",
    ):
        rewards.score(["p"], ["a"], [{}])


def test_a_fit_whose_reward_always_fails_does_not_exit_quietly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    from lit_gcpo.running.cli import main

    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=12), "--data.rewards", "[unusable_rewards:always_fails]"]
    refused = r"'unusable_rewards:always_fails' gave no usable score in 10 batches in a row \(last: raised ValueError"
    with pytest.raises(RewardError, match=refused):
        main(["fit", *args, "--data.accuracy_reward", "null", "--trainer.limit_val_batches", "0"])


def test_batches_without_any_gold_do_not_count_as_unusable():
    calls = {"n": 0}

    def gold_or_fail(prompts, completions, **columns):
        calls["n"] += 1
        if calls["n"] % 2:
            return [None] * len(completions)  # rows without gold
        raise ValueError("boom")

    rewards = RewardSet([RewardTerm("g", gold_or_fail)], max_unusable_batches=2)
    for _ in range(3):  # None, fail (1), None: still below the limit
        rewards.score(["p"], ["a"], [{}])
    with pytest.raises(RewardError, match=r"'g' gave no usable score in 2 batches"):
        rewards.score(["p"], ["a"], [{}])  # fail (2)


def test_a_user_reward_that_prints_still_scores_and_gets_the_columns(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rewards = RewardSet.from_names(["unusable_rewards:chatty"], timeout=5.0)
    scores = rewards.score(["p"] * 3, ["a", "b", "c"], [{"answer": "12"}, {"answer": None}, {"answer": "abcd"}])
    assert scores.components["unusable_rewards:chatty"].tolist() == [2.0, 0.0, 4.0]
    assert scores.metrics["reward/unusable_rewards:chatty_failures"] == 0.0


def test_a_short_fit_without_any_usable_reward_fails_at_its_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    from lit_gcpo.running.cli import main

    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=3), "--data.rewards", "[unusable_rewards:always_fails]"]
    with pytest.raises(RewardError, match=r"no batch of this run had a usable reward \(3 batches scored by"):
        main(["fit", *args, "--data.accuracy_reward", "null", "--trainer.limit_val_batches", "0"])
