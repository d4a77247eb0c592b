"""Label-free training (``data.label_free``): the rewards written into a batch by hand, the settings refused at
parse time naming the option, and a real fit on a prompt file without gold answers that reads no gold."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import CaptureBatches, trainer

from lit_gcpo.algorithms.label_free import EMPO, RENT, TTRL, SelfCertainty
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.data.label_free import apply_label_free, label_free_problem, reward_sets
from lit_gcpo.data.sources import LocalFiles
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.running.cli import main
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.module import GRPOModule

TINY_ARITH = "lit-gcpo/tiny-arith"  # the embedded warm-started policy: it writes boxed answers


def _batch(answers, clusters, group_size: int, length: int = 2, rewards=None) -> RolloutBatch:
    n = len(answers)
    return RolloutBatch(
        prompts=["p"] * (n // group_size),
        rows=[{}] * (n // group_size),
        completions=[""] * n,
        input_ids=torch.zeros(n, 1 + length, dtype=torch.long),
        attention_mask=torch.ones(n, 1 + length, dtype=torch.long),
        completion_mask=torch.ones(n, length),
        group_ids=torch.arange(n // group_size).repeat_interleave(group_size),
        rewards=torch.zeros(n) if rewards is None else torch.tensor(rewards),
        answers=answers,
        answer_clusters=None if clusters is None else torch.tensor(clusters),
    )


def test_ttrl_reward_plus_the_extras_by_hand():
    # group 0: "4", "4", "7" -> "4" wins -> [1, 1, 0]; group 1: none, "5", "5" -> [0, 1, 1] (no answer: no vote).
    # The extras' total [0.5, NaN, 0, 0, 0, 0.25] is added, NaN counting 0: [1.5, 1, 0, 0, 1, 1.25].
    batch = _batch(["4", "4", "7", None, "5", "5"], [0, 0, 1, 0, 1, 1], 3, rewards=[0.5, math.nan, 0, 0, 0, 0.25])
    apply_label_free(batch, TTRL())
    assert batch.reward_components["ttrl"].tolist() == [1, 1, 0, 0, 1, 1]
    assert batch.rewards.tolist() == [1.5, 1.0, 0.0, 0.0, 1.0, 1.25]
    assert batch.metrics["label_free/majority_ratio_mean"] == pytest.approx(2 / 3, abs=1e-6)  # 2 of 3 in both
    assert batch.metrics["label_free/answered_frac"] == pytest.approx(5 / 6, abs=1e-6)


def test_empo_drops_the_prompts_outside_its_band_by_hand():
    # group 0: clusters {4, 4} and {7}: SE = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.6365, SE_n = 0.6365 / ln 3 = 0.5794,
    # inside (0, 0.9): r = [2/3, 2/3, 1/3]. group 1: one cluster, SE_n = 0, not > 0: dropped, every total 0 (its
    # extras too). group 2: three clusters, SE_n = 1, not < 0.9: dropped.
    batch = _batch(["4", "4", "7", "3", "3", "3", "1", "2", "5"], [0, 0, 1, 0, 0, 0, 0, 1, 2], 3, rewards=[0.0] * 9)
    batch.rewards[3] = 5.0
    apply_label_free(batch, EMPO(delta_lo=0.0, delta_hi=0.9))
    expected = [2 / 3, 2 / 3, 1 / 3] + [0.0] * 6
    torch.testing.assert_close(batch.rewards, torch.tensor(expected), atol=1e-6, rtol=0)
    assert batch.reward_components["empo"][3:6].tolist() == [1.0, 1.0, 1.0]  # the shares themselves, before the band
    assert batch.metrics["label_free/kept_frac"] == pytest.approx(1 / 3, abs=1e-6)
    se_n = [0.6365141682948128 / math.log(3), 0.0, 1.0]
    assert batch.metrics["label_free/se_n_mean"] == pytest.approx(sum(se_n) / 3, abs=1e-6)


def test_token_distribution_rewards_by_hand():
    # Self-certainty KL(U || p) = -log V - mean_v log p: with token_mean_logprob = -log 4 - c the reward is the mean
    # of c over the completion's tokens: [(0.1 + 0.3) / 2, 0.5] (the second completion's last token is padding).
    batch = _batch(["1", "2"], None, 2)
    batch.completion_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch.token_mean_logprob = -math.log(4) - torch.tensor([[0.1, 0.3], [0.5, 7.0]])
    batch.vocab_size = 4
    apply_label_free(batch, SelfCertainty())
    torch.testing.assert_close(batch.rewards, torch.tensor([0.2, 0.5]), atol=1e-6, rtol=0)
    # RENT: minus the mean token entropy, [-(0.2 + 0.4) / 2, -0.6]; last_k = 1: the last token only, [-0.4, -0.6]
    batch.token_entropy = torch.tensor([[0.2, 0.4], [0.6, 9.0]])
    for options, expected in ((RENT(), [-0.3, -0.6]), (RENT(last_k=1), [-0.4, -0.6])):
        batch.rewards = torch.zeros(2)
        apply_label_free(batch, options)
        torch.testing.assert_close(batch.rewards, torch.tensor(expected), atol=1e-6, rtol=0)
    # without the scoring pass's summaries the reward is refused, naming the field
    batch.token_entropy = None
    with pytest.raises(ValueError, match=r"rent needs batch.token_entropy"):
        apply_label_free(batch, RENT())


def test_label_free_settings_are_refused_naming_the_option():
    assert label_free_problem(None, ["math_accuracy"], "math_accuracy") is None
    assert label_free_problem(TTRL(), [], "math_accuracy_final") is None
    assert label_free_problem(TTRL(), ["format"], "math_accuracy_final") is None  # an extra reward without golds
    problem = label_free_problem(EMPO(), ["format", "qa_f1"], "math_accuracy")
    assert problem.startswith("data.rewards: 'qa_f1' reads the gold answer")
    noisy = label_free_problem(RENT(), ["lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"], None)
    assert noisy.startswith("data.rewards: 'lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy' reads the gold")
    with pytest.raises(ValueError, match=r"data.rewards: 'math_accuracy' reads the gold answer, which label-free"):
        RolloutDataModule(label_free=TTRL(), rewards=["math_accuracy"], accuracy_reward="math_accuracy")
    # dynamic sampling filters groups by the collected rewards, before the scoring pass the label-free reward needs
    problem = label_free_problem(TTRL(), [], "math_accuracy", dynamic_sampling=True)
    assert problem.startswith("data.dynamic_sampling keeps the groups whose rewards spread when they are collected")
    with pytest.raises(ValueError, match=r"data\.dynamic_sampling keeps the groups"):
        RolloutDataModule(label_free=TTRL(), accuracy_reward="math_accuracy", dynamic_sampling={"max_rounds": 2})
    # label-free: rewards default to none, and accuracy_reward (evaluation) need not be one of them
    data = RolloutDataModule(label_free=SelfCertainty(), accuracy_reward="math_accuracy")
    assert data.reward_names == []
    train, evaluation = reward_sets([], None, 1.0, TTRL(), "math_accuracy")
    assert train.names == [] and evaluation.names == ["math_accuracy"]
    assert train.score(["p"], ["c"], [{"answer": "1"}]).total.tolist() == [0.0]  # scores nothing, reads no row
    train, evaluation = reward_sets(["format"], [0.5], 1.0, TTRL(), "math_accuracy")
    assert train.names == ["format"] and evaluation.names == ["math_accuracy", "format"]
    assert [term.weight for term in evaluation.terms] == [1.0, 0.5]
    _, nothing = reward_sets([], None, 1.0, TTRL(), None)  # nothing grades: the fit's end check sees no batch
    assert nothing.scored_batches == nothing.usable_batches == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data.label_free", "TTRL"], "error: data.rewards: 'math_accuracy_final' reads the gold answer"),
        (
            ["--data.label_free", "EMPO", "--data.rewards", "[]", "--data.label_free.delta_lo", "0.7",
             "--data.label_free.delta_hi", "0.2"],
            "error: data.label_free: empo needs delta_lo < delta_hi",
        ),
        (
            ["--data.label_free", "RENT", "--data.rewards", "[]", "--data.label_free.last_k", "0"],
            "error: data.label_free: rent's last_k must be None (every token) or an int >= 1, got 0",
        ),
        (
            ["--data.label_free", "TTRL", "--data.rewards", "[]", "--data.dynamic_sampling.max_rounds", "2"],
            "error: data.dynamic_sampling keeps the groups whose rewards spread when they are collected",
        ),
        (
            ["--model.token_selection", "HighEntropyTokens", "--model.token_selection.rho", "1.5"],
            "error: model.token_selection: high_entropy_tokens needs rho (top_entropy_quantile) in (0, 1], got 1.5",
        ),
        (
            ["--model.token_selection", "HighEntropyTokens", "--model.token_selection.rho", "0"],
            "error: model.token_selection: high_entropy_tokens needs rho (top_entropy_quantile) in (0, 1], got 0",
        ),
        (
            ["--model.token_selection", "ClipCov", "--model.token_selection.lb", "2", "--model.token_selection.ub",
             "1"],
            "error: model.token_selection: clip_cov needs lb < ub",
        ),
        (
            ["--model.token_selection", "KLCov", "--model.token_selection.coef", "-1"],
            "error: model.token_selection: kl_cov's coef (ppo_kl_coef) must be >= 0",
        ),
    ],
)  # fmt: skip
def test_method_options_are_refused_at_parse_time(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", *arguments])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def _label_free_pair(model_dir: str, train, label_free, val: bool) -> tuple[GRPOModule, RolloutDataModule]:
    module = GRPOModule(model=model_dir, max_grad_norm=0.0, log_samples_every_n_steps=0, export_dir=None)
    data = RolloutDataModule(
        train=train,
        val=ArithmeticTask("validation", num_train=64, num_val=6, seed=1) if val else None,
        batch_size=3,
        group_size=4,
        label_free=label_free,
        rewards=None if label_free is not None else ["math_accuracy"],
        accuracy_reward="math_accuracy",
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
        seed=3,
    )
    return module, data


def test_ttrl_trains_on_a_prompt_file_without_golds_and_reads_none(tmp_path, monkeypatch):
    """The training file has a prompt column only; validation grades with the golds of its own set. A spy on the
    gold reader of the math rewards counts its calls: none while training label-free, some in the control (the
    same fit graded with math_accuracy) and in the validation."""
    import lit_gcpo.rewards.math_reward as math_reward

    gold_reads: list[int] = []
    original = math_reward._row_gold
    monkeypatch.setattr(math_reward, "_row_gold", lambda *a, **k: gold_reads.append(1) or original(*a, **k))
    prompts = tmp_path / "prompts.jsonl"
    rows = ArithmeticTask("train", num_train=64, num_val=8, seed=1).load()[:24]
    prompts.write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows))

    module, data = _label_free_pair(TINY_ARITH, LocalFiles(str(prompts)), TTRL(), val=False)
    capture = CaptureBatches(fields=())
    trainer(tmp_path / "ttrl", 2, callbacks=[capture]).fit(module, data)
    assert gold_reads == []  # not one gold read in training
    for batch in capture.batches:
        assert set(batch.reward_components) == {"ttrl"} and batch.correct is None
        assert all("answer" not in row for row in batch.rows)
        expected = torch.zeros(batch.num_completions)  # TTRL by a plain loop over the answer clusters
        for group in range(batch.num_groups):
            members = [i for i in range(batch.num_completions) if int(batch.group_ids[i]) == group]
            votes: dict[int, int] = {}
            for i in members:
                if batch.answers[i] is not None:
                    votes[int(batch.answer_clusters[i])] = votes.get(int(batch.answer_clusters[i]), 0) + 1
            if votes:
                winner = max(votes, key=lambda c: (votes[c], -min(i for i in members if batch.answer_clusters[i] == c)))
                for i in members:
                    expected[i] = float(batch.answers[i] is not None and int(batch.answer_clusters[i]) == winner)
        torch.testing.assert_close(batch.rewards, expected)
    rewarded = torch.cat([batch.rewards for batch in capture.batches])
    assert 0 < float(rewarded.sum()) < rewarded.numel()  # the warm-started policy answers, and not all alike
    # validation still grades with the golds of the validation set
    module, data = _label_free_pair(TINY_ARITH, LocalFiles(str(prompts)), TTRL(), val=True)
    run = trainer(tmp_path / "val", 1, limit_val_batches=None, num_sanity_val_steps=0)
    run.validate(module, data)
    assert gold_reads and "val/accuracy" in run.callback_metrics
    # the control: the same fit with a gold reward reads golds in training
    gold_reads.clear()
    train = ArithmeticTask("train", num_train=64, num_val=8, seed=1)
    module, data = _label_free_pair(TINY_ARITH, train, None, val=False)
    trainer(tmp_path / "control", 1).fit(module, data)
    assert gold_reads


def test_ttrl_with_one_step_off_policy_rollouts_reads_no_gold(tmp_path, monkeypatch):
    """data.off_policy samples the next batch in a worker with its own collector: it scores with the training reward
    set too (none here), and the label-free reward is still written after the scoring pass."""
    import lit_gcpo.rewards.math_reward as math_reward

    gold_reads: list[int] = []
    original = math_reward._row_gold
    monkeypatch.setattr(math_reward, "_row_gold", lambda *a, **k: gold_reads.append(1) or original(*a, **k))
    module, _ = _label_free_pair(TINY_ARITH, None, TTRL(), val=False)
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=64, num_val=8, seed=1),
        batch_size=3,
        group_size=4,
        label_free=TTRL(),
        accuracy_reward="math_accuracy",
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
        off_policy=True,
        seed=3,
    )
    capture = CaptureBatches(fields=())
    trainer(tmp_path, 3, callbacks=[capture]).fit(module, data)
    assert gold_reads == [] and len(capture.batches) == 3
    for batch in capture.batches:
        assert set(batch.reward_components) == {"ttrl"} and not batch.samples_from_policy  # the worker's engine
        torch.testing.assert_close(batch.rewards, batch.reward_components["ttrl"])
