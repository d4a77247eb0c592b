"""What a step computes follows what is read: the scoring pass, answer clusters and entropy only when needed,
with the same update as computing everything; the step's scalars logged at Lightning's cadence; DAPO's masking
of truncated completions."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_training import CaptureBatches, _final_weights, make_pair, trainer

from lit_gcpo.callbacks import UncertaintyCallback
from lit_gcpo.data.batch import requested_fields
from lit_gcpo.training.scoring import CompletionScorer
from lit_gcpo.training.step_metrics import mean_over_ranks


class Declares:
    def __init__(self, **by_stage: set[str]) -> None:
        self.by_stage = by_stage

    def rollout_fields(self, stage: str) -> set[str]:
        return self.by_stage.get(stage, set())


def test_requested_fields_is_the_union_of_the_declarations():
    callbacks = [Declares(train={"embeddings"}), object(), Declares(train={"seq_logprobs"}, test={"answer_clusters"})]
    assert requested_fields(callbacks, "train") == {"embeddings", "seq_logprobs"}
    assert requested_fields(callbacks, "test") == {"answer_clusters"}
    assert requested_fields(callbacks, "val") == set()
    with pytest.raises(ValueError, match=r"Declares.rollout_fields\('train'\) names \['logits'\]; optional fields are"):
        requested_fields([Declares(train={"logits"})], "train")


def test_uncertainty_callback_declares_what_it_reads():
    gcpo = UncertaintyCallback(method="gcpo", clustering="answer", embeddings="batch", se_kind="rao")
    assert gcpo.rollout_fields("train") == {"embeddings", "seq_logprobs", "answer_clusters"}
    assert gcpo.rollout_fields("val") == set()
    seed = UncertaintyCallback(method="seed_grpo", clustering="embedding", embeddings="batch", se_kind="discrete")
    assert seed.rollout_fields("train") == {"embeddings"}


class CountScorer:
    """Counts the policy's scoring forward passes and whether each computed the entropy."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[bool] = []
        original = CompletionScorer.__call__

        def counted(scorer, *args, **kwargs):
            self.calls.append(bool(kwargs.get("with_entropy", False)))
            return original(scorer, *args, **kwargs)

        monkeypatch.setattr(CompletionScorer, "__call__", counted)


def _train(tiny_model_dir, path, steps, callbacks, lr=0.5, **module_kwargs):
    L.seed_everything(0)
    module, data = make_pair(tiny_model_dir, lr=lr, **module_kwargs)
    run = trainer(path, steps, callbacks=callbacks, log_every_n_steps=1)
    run.fit(module, data)
    return module, run


def test_on_policy_update_without_the_scoring_pass_equals_the_update_with_it(tiny_model_dir, tmp_path, monkeypatch):
    """Nothing reads old_logprobs: the training pass's own (detached) log-probs are the old ones, one forward pass
    per step instead of two, and the weights and logged loss are those of the run that scored first."""
    counter = CountScorer(monkeypatch)
    skipped = CaptureBatches(fields=())
    lean, lean_run = _train(tiny_model_dir, tmp_path / "lean", 3, [skipped])
    lean_calls = len(counter.calls)
    full, full_run = _train(tiny_model_dir, tmp_path / "full", 3, [CaptureBatches()])
    assert lean_calls == 3 and len(counter.calls) - lean_calls == 6
    assert all(batch.old_logprobs is None and batch.answer_clusters is None for batch in skipped.batches)
    lean_weights, full_weights = _final_weights(lean), _final_weights(full)
    for name, value in full_weights.items():
        torch.testing.assert_close(lean_weights[name], value, atol=1e-6, rtol=0, msg=name)
    for key in ("train/loss", "train/ratio_max", "train/entropy"):
        assert float(lean_run.logged_metrics[key]) == pytest.approx(float(full_run.logged_metrics[key]), abs=1e-6)
    start = _final_weights(make_pair(tiny_model_dir)[0])  # the weights on disk
    assert any((lean_weights[name] - start[name]).abs().max() > 1e-4 for name in start)  # it trained


def test_the_scoring_pass_runs_when_the_loss_needs_old_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    counter = CountScorer(monkeypatch)
    capture = CaptureBatches(fields=())
    _train(tiny_model_dir, tmp_path, 4, [capture], num_iterations=2)  # max_steps counts optimizer steps: 2 batches
    assert len(counter.calls) == 2 * (1 + 2)  # per batch: the scoring pass, then one pass per iteration
    assert all(batch.old_logprobs is not None for batch in capture.batches)


def test_answer_clusters_only_when_a_callback_reads_them(tiny_model_dir, tmp_path):
    from lit_gcpo.algorithms.clustering import answer_clusters

    capture = CaptureBatches(fields=("answer_clusters",))
    _train(tiny_model_dir, tmp_path, 1, [capture])
    batch = capture.batches[0]
    assert batch.old_logprobs is None  # clusters do not need the scoring pass
    assert torch.equal(batch.answer_clusters, answer_clusters(batch.answers, batch.group_ids))


def _planted_verdicts(monkeypatch, fails) -> None:
    """Answer clustering's default equivalence replaced: string equality, and no verdict for the pairs ``fails``
    accepts (as a Math-Verify timeout gives)."""
    import lit_gcpo.algorithms.clustering as clustering
    from lit_gcpo.rewards.answers import Verdict

    def planted(a: str, b: str) -> Verdict:
        return Verdict(False, "planted: no verdict") if fails(a, b) else Verdict(a == b)

    monkeypatch.setattr(clustering, "_default_equivalence", lambda: planted)


def test_a_batch_counts_its_clustering_comparisons_without_a_verdict(monkeypatch, caplog):
    from lit_gcpo.data.rollout import timed_answer_clusters

    _planted_verdicts(monkeypatch, lambda a, b: {a, b} == {"1", "2"})
    answers = ["1", "2", "1", "3", "2", "1", None]
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    with caplog.at_level("WARNING", logger="lit_gcpo.rewards.answers"):
        clusters, metrics = timed_answer_clusters(answers, group_ids)
    # group 0: "2" against "1" gets no verdict (1), a new cluster; "1" is "1"; "3" against "1" and "2": verdicts, no.
    # group 1: "1" against "2" is the same pair, taken from the batch's cache (not compared again): 1 in all
    assert metrics["rollout/answer_cluster_failures"] == 1.0 and metrics["time/answer_clusters_s"] >= 0
    assert clusters.tolist() == [0, 1, 0, 2, 0, 1, 2]  # as if "not equivalent" had been the verdict
    (warning,) = [r.getMessage() for r in caplog.records if "answer clustering" in r.getMessage()]
    assert "1 comparisons of 7 completions" in warning and "completion 1 (group 0) against 0: planted" in warning
    _planted_verdicts(monkeypatch, lambda a, b: False)
    assert timed_answer_clusters(answers, group_ids)[1]["rollout/answer_cluster_failures"] == 0.0


def test_a_training_step_logs_its_clustering_comparisons_without_a_verdict(tiny_model_dir, tmp_path, monkeypatch):
    """Every comparison of two different answers gets no verdict; each completion's text is its answer (the random
    policy writes no boxes). The logged count is the plain count of the different answer pairs within the groups."""
    import lit_gcpo.data.rollout as rollout

    monkeypatch.setattr(rollout, "final_answer", lambda text: text)
    _planted_verdicts(monkeypatch, lambda a, b: a != b)
    capture = CaptureBatches(fields=("answer_clusters",))
    _, run = _train(tiny_model_dir, tmp_path, 2, [capture])
    expected = []
    for batch in capture.batches:
        pairs = set()  # greedy clustering compares a new answer with every cluster's first, all different here
        groups = batch.group_ids.tolist()
        for group in range(batch.num_groups):
            texts = sorted({a.strip() for a, g in zip(batch.answers, groups, strict=True) if g == group} - {""})
            pairs |= {(a, b) for i, a in enumerate(texts) for b in texts[i + 1 :]}
        expected.append(float(len(pairs)))
        assert batch.metrics["rollout/answer_cluster_failures"] == expected[-1]
        assert torch.equal(batch.answer_clusters, _equal_string_clusters(batch.answers, batch.group_ids))
    assert min(expected) > 0  # the random policy's completions differ
    assert float(run.logged_metrics["rollout/answer_cluster_failures"]) == expected[-1]


def _equal_string_clusters(answers: list[str], group_ids: torch.Tensor) -> torch.Tensor:
    """Each group's clusters of equal stripped answers (an empty one alone), local ids in order of appearance."""
    ids, clusters = [], {}
    for n, (answer, group) in enumerate(zip(answers, group_ids.tolist(), strict=True)):
        key = (group, answer.strip()) if answer.strip() else (group, n)
        if key not in clusters:
            clusters[key] = sum(1 for other in clusters if other[0] == group)
        ids.append(clusters[key])
    return torch.tensor(ids)


def test_entropy_is_computed_on_logged_steps_only(tiny_model_dir, tmp_path, monkeypatch):
    counter = CountScorer(monkeypatch)
    L.seed_everything(0)
    module, data = make_pair(tiny_model_dir, lr=0.5)
    logger = CSVLogger(tmp_path, name="csv")
    run = trainer(tmp_path, 4, logger=logger, log_every_n_steps=2)
    run.fit(module, data)
    # Lightning logs a step when (batches stepped + 1) % log_every_n_steps == 0: steps 1 and 3 (0-based)
    assert counter.calls == [False, True, False, True]
    rows = list(csv.DictReader(Path(logger.log_dir, "metrics.csv").read_text().splitlines()))
    logged = [row for row in rows if row.get("train/loss")]
    assert [int(row["step"]) for row in logged] == [1, 3]
    assert all(row["train/entropy"] and row["epoch"] == "0" for row in logged)
    assert "train/loss" in run.callback_metrics and "reward/mean" in run.callback_metrics


def test_entropy_in_the_loss_is_computed_on_every_step(tiny_model_dir, tmp_path, monkeypatch):
    counter = CountScorer(monkeypatch)
    L.seed_everything(0)
    module, data = make_pair(tiny_model_dir, lr=0.5, entropy_coef=0.01)
    trainer(tmp_path, 3, log_every_n_steps=50).fit(module, data)
    assert counter.calls == [True, True, True]


def test_mean_over_ranks_is_one_collective_over_every_value():
    calls = []
    other_rank = torch.tensor([3.0, float("nan"), -1.0], dtype=torch.float64)

    def reduce(tensor, op):
        calls.append(op)
        return tensor + other_rank  # the sum over two ranks

    values = {"a": torch.tensor(1.0), "b": 2.0, "c": torch.tensor(5.0)}
    means = mean_over_ranks(values, reduce, world_size=2, device=torch.device("cpu"))
    assert calls == ["sum"]
    assert means["a"] == 2.0 and means["c"] == 2.0 and means["b"] != means["b"]  # (1+3)/2, (5-1)/2, NaN stays
    assert mean_over_ranks(values, reduce, world_size=1, device=torch.device("cpu")) is values
    counts = mean_over_ranks(values, reduce, world_size=2, device=torch.device("cpu"), summed={"c"})
    assert counts["a"] == 2.0 and counts["c"] == 4.0 and calls == ["sum", "sum"]  # 5 - 1: a count is added up


def test_a_step_logs_counts_summed_over_ranks_and_the_rest_averaged(monkeypatch):
    """log_training_step on a simulated second rank (its values: this rank's + 1): counts of this rank's completions
    (reward failures, answer clustering's) add up, the other rollout metrics are averaged."""
    from types import SimpleNamespace

    from lit_gcpo.training import step_metrics

    written = {}
    monkeypatch.setattr(step_metrics, "log_step_scalars", lambda trainer, values: written.update(values))
    metrics = {"rollout/answer_cluster_failures": 3.0, "reward/r_failures": 2.0, "time/generate_s": 0.5}
    metrics["reward/rm_truncated"] = 1.0  # a reward model's truncated texts on this rank
    batch = SimpleNamespace(
        rewards=torch.tensor([0.0, 1.0]), reward_components={}, advantage_weights=None, correct=None, metrics=metrics
    )
    batch.num_groups = 1
    module = SimpleNamespace(
        trainer=SimpleNamespace(world_size=2),
        device=torch.device("cpu"),
        reduce_over_ranks=lambda tensor, op: tensor + (tensor + 1),  # the other rank's values are ours + 1
        log=lambda *args, **kwargs: None,
        hparams=SimpleNamespace(log_samples_every_n_steps=0),
        logger=None,
    )
    step_metrics.log_training_step(module, batch, 0, {}, {}, train_s=1.0)
    assert written["rollout/answer_cluster_failures"] == 7.0 and written["reward/r_failures"] == 5.0  # 3 + 4, 2 + 3
    assert written["time/generate_s"] == 1.0 and written["reward/mean"] == 1.0  # (0.5 + 1.5) / 2, (0.5 + 1.5) / 2
    assert written["time/train_s"] == 1.5 and written["reward/rm_truncated"] == 3.0  # 1 + 2


class MarkTruncated(L.Callback):
    """Marks the given completions of every batch truncated; ``zero_masks`` also zeroes their completion masks by
    hand (the expected effect of mask_truncated_completions on the loss)."""

    def __init__(self, rows: list[int] | None, zero_masks: bool = False) -> None:
        self.rows, self.zero_masks = rows, zero_masks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        truncated = torch.zeros(batch.num_completions, dtype=torch.bool)
        truncated[self.rows if self.rows is not None else slice(None)] = True
        batch.truncated = truncated
        if self.zero_masks:
            batch.completion_mask = batch.completion_mask * (~truncated).unsqueeze(-1).float()


def test_masking_truncated_completions_equals_removing_their_tokens(tiny_model_dir, tmp_path):
    rows = [0, 5, 9]
    masked, masked_run = _train(
        tiny_model_dir, tmp_path / "m", 2, [MarkTruncated(rows)], mask_truncated_completions=True
    )
    by_hand, hand_run = _train(tiny_model_dir, tmp_path / "h", 2, [MarkTruncated(rows, zero_masks=True)])
    plain, _ = _train(tiny_model_dir, tmp_path / "p", 2, [MarkTruncated(rows)])
    got, expected, unmasked = _final_weights(masked), _final_weights(by_hand), _final_weights(plain)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    assert float(masked_run.logged_metrics["train/loss"]) == pytest.approx(float(hand_run.logged_metrics["train/loss"]))
    assert any((got[name] - unmasked[name]).abs().max() > 1e-4 for name in got)  # the option does something


def test_a_batch_of_only_truncated_completions_is_a_zero_loss_not_a_skipped_step(tiny_model_dir, tmp_path):
    module, run = _train(tiny_model_dir, tmp_path, 1, [MarkTruncated(None)], mask_truncated_completions=True)
    assert module.skipped_steps == 0
    assert float(run.logged_metrics["train/loss"]) == 0.0


def test_gcpo_with_the_hf_engine_takes_embeddings_and_sequence_logprobs_from_sampling(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The uncertainty callback reads embeddings and Rao entropy's sequence log-probs: the hf engine gathers both
    while sampling, so a step makes one forward pass of the policy (training); they equal the scoring pass's."""
    counter = CountScorer(monkeypatch)
    capture = CaptureBatches(fields=())
    callback = UncertaintyCallback(method="gcpo", clustering="answer", embeddings="batch", se_kind="rao")
    module, _ = _train(tiny_model_dir, tmp_path, 2, [callback, capture], lr=0.0)
    assert counter.calls == [True, True]  # the training passes only
    batch = capture.batches[-1]
    assert batch.old_logprobs is None and batch.embeddings is not None and batch.answer_clusters is not None
    from_sampling = batch.embeddings.clone(), batch.seq_logprobs.clone()
    batch.embeddings = None
    module.score_rollout(batch, with_reference=False, fields={"embeddings", "old_logprobs"})
    torch.testing.assert_close(from_sampling[0], batch.embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_sampling[1], batch.seq_logprobs, atol=1e-5, rtol=0)
