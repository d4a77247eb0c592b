"""UncertaintyCallback in real Lightning Trainer runs, with a LightningModule unrelated to lit-gcpo."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lit_gcpo.algorithms.clustering import answer_clusters, embedding_clusters
from lit_gcpo.algorithms.uncertainty import advantage_weights, uncertainty_signals
from lit_gcpo.callbacks import UncertaintyCallback
from lit_gcpo.callbacks.uncertainty import DEFAULT_SENTENCE_MODEL, resolve_sentence_model
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.rewards.answers import answers_equivalent

GROUPS, GROUP_SIZE, DIM = 4, 4, 6
ANSWER_POOL = [r"\frac12", "0.5", "1/2", "3", "x+1", None, "7"]


def _dict_batch(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    n = GROUPS * GROUP_SIZE
    picks = torch.randint(0, len(ANSWER_POOL), (n,), generator=generator).tolist()
    return {
        "x": torch.randn(n, 3, generator=generator),
        "group_ids": torch.arange(GROUPS).repeat_interleave(GROUP_SIZE),
        "rewards": torch.randint(0, 2, (n,), generator=generator).float(),
        "answers": [ANSWER_POOL[p] for p in picks],
        "embeddings": torch.randn(n, DIM, generator=generator),
        "seq_logprobs": -2 * torch.rand(n, generator=generator),
    }


class _RecordingModule(pl.LightningModule):
    """A plain regression module that only reads ``advantage_weights`` from its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[dict[str, Any], torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        weights = batch["advantage_weights"]  # [N]
        self.seen.append((batch, weights.clone()))
        return (self.layer(batch["x"]).squeeze(-1) * weights).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: list[Any]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda item: item)


def _trainer(tmp_path, callback: UncertaintyCallback, max_steps: int, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {"logger": False, "enable_checkpointing": False}
    defaults.update(kwargs)
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, **defaults,
    )  # fmt: skip


def _expected_weights(batch: dict[str, Any], method: str, **options: Any) -> tuple[torch.Tensor, dict]:
    group_ids = batch["group_ids"]
    cluster_ids = answer_clusters(batch["answers"], group_ids, equivalent=answers_equivalent)
    signals, _ = uncertainty_signals(
        group_ids, GROUPS, rewards=batch["rewards"], cluster_ids=cluster_ids, embeddings=batch["embeddings"],
        seq_logprobs=batch.get("seq_logprobs"), se_kind=options.pop("se_kind", "rao"),
    )  # fmt: skip
    weights, details = advantage_weights(method, signals, **options)
    return weights[group_ids], {**signals, "u": details["u"], "weight": weights}


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gcpo", {}),
        ("seed_grpo", {}),
        ("rd_only", {}),
        ("seed_grpo", {"alpha": 1.0, "scale": "batch_mean", "normalise": True}),
        ("gcpo", {"geometric": "cd", "family": "focal", "alpha": 0.5, "gamma": 3.0, "normalise": False}),
    ],
)
def test_weights_in_training_step_equal_pure_functions(tmp_path, method: str, options: dict) -> None:
    batches = [_dict_batch(seed) for seed in range(3)]
    callback = UncertaintyCallback(method=method, clustering="answer", **options)
    module = _RecordingModule()
    trainer = _trainer(tmp_path, callback, max_steps=3)
    trainer.fit(module, _loader(batches))
    assert len(module.seen) == 3
    for seed, (_, weights) in enumerate(module.seen):
        expected, signals = _expected_weights(_dict_batch(seed), method, **options)
        torch.testing.assert_close(weights, expected)
    # The last step's statistics are logged under uncertainty/<signal>_<statistic>.
    metrics = trainer.logged_metrics
    torch.testing.assert_close(metrics["uncertainty/se_n_max"], signals["se_n"].max())
    torch.testing.assert_close(metrics["uncertainty/bot_mean"], signals["bot"].mean())
    torch.testing.assert_close(metrics["uncertainty/rd_min"], signals["rd"].min())
    torch.testing.assert_close(metrics["uncertainty/weight_mean"], expected.view(GROUPS, GROUP_SIZE)[:, 0].mean())
    # The per-step spread of u and of the weights (METHODS.md §5.1), over all groups and over those with RD > 0.
    spread = signals["rd"] > 0
    torch.testing.assert_close(metrics["uncertainty/weight_std"], signals["weight"].std(unbiased=False))
    torch.testing.assert_close(metrics["uncertainty/u_max"], signals["u"].max())
    torch.testing.assert_close(metrics["uncertainty/weight_spread_std"], signals["weight"][spread].std(unbiased=False))
    torch.testing.assert_close(metrics["uncertainty/weight_spread_min"], signals["weight"][spread].min())
    torch.testing.assert_close(metrics["uncertainty/num_clusters_max"], signals["num_clusters"].max())
    assert "uncertainty/corr_rd/bot_spearman" in metrics and "time/uncertainty_s" in metrics
    assert metrics["time/uncertainty_s"] > 0
    assert callback.batches_seen == 3 and callback.groups_seen == 3 * GROUPS


def test_rao_falls_back_to_discrete_with_one_warning(tmp_path) -> None:
    batches = [_dict_batch(seed) for seed in range(2)]
    for batch in batches:
        del batch["seq_logprobs"]
    module = _RecordingModule()
    with pytest.warns(UserWarning, match="seq_logprobs") as record:
        _trainer(tmp_path, UncertaintyCallback(method="seed_grpo"), max_steps=2).fit(module, _loader(batches))
    assert sum("seq_logprobs" in str(w.message) for w in record) == 1
    expected, _ = _expected_weights(batches[1], "seed_grpo", se_kind="discrete")
    torch.testing.assert_close(module.seen[1][1], expected)


def test_state_and_diagnostics_window_survive_a_checkpoint_resume(tmp_path) -> None:
    """Diagnostics every 3 batches: at batch 1 and batch 4. Interrupted after batch 2 (whose groups wait in the
    window) and resumed from the checkpoint, batch 4 must still correlate the groups of batches 2, 3 and 4
    (the two batches after the resume are those the resumed module received)."""
    from scipy.stats import spearmanr

    batches = [_dict_batch(seed) for seed in range(4)]
    first = UncertaintyCallback(method="gcpo", clustering="answer", log_histograms_every_n_steps=3)
    trainer = _trainer(tmp_path, first, max_steps=2)
    trainer.fit(_RecordingModule(), _loader(batches[:2]))
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert (state["batches_seen"], state["groups_seen"]) == (2, 2 * GROUPS)
    torch.testing.assert_close(state["window"]["pooled"]["bot"], _expected_weights(batches[1], "gcpo")[1]["bot"])
    resumed = UncertaintyCallback(method="gcpo", clustering="answer", log_histograms_every_n_steps=3)
    resumed_trainer = _trainer(tmp_path, resumed, max_steps=4)
    module = _RecordingModule()
    resumed_trainer.fit(module, _loader(batches[2:]), ckpt_path=path)
    assert resumed.batches_seen == 4 and resumed.groups_seen == 4 * GROUPS  # 2 restored + 2 new steps
    # the checkpointed groups of batch 2, then those of the two batches the resumed run trained on
    pooled = [_expected_weights(batch, "gcpo")[1] for batch in [batches[1], *(b for b, _ in module.seen)]]
    bot = torch.cat([signals["bot"] for signals in pooled]).double().numpy()
    rd = torch.cat([signals["rd"] for signals in pooled]).double().numpy()
    logged = float(resumed_trainer.logged_metrics["uncertainty/corr_rd/bot_spearman"])
    assert logged == pytest.approx(spearmanr(bot, rd).statistic, abs=1e-5)
    assert len(resumed.window) == 0


def test_embedding_clustering_and_rollout_batch(tmp_path) -> None:
    # The same contract through lit_gcpo.data.batch.RolloutBatch (mapping-style access).
    raw = _dict_batch(7)
    n = GROUPS * GROUP_SIZE
    rollout = RolloutBatch(
        prompts=[f"p{b}" for b in range(GROUPS)], rows=[{} for _ in range(GROUPS)],
        completions=[f"\\boxed{{{a}}}" if a else "no answer" for a in raw["answers"]],
        input_ids=torch.zeros(n, 5, dtype=torch.long), attention_mask=torch.ones(n, 5, dtype=torch.long),
        completion_mask=torch.ones(n, 3), group_ids=raw["group_ids"], rewards=raw["rewards"],
        embeddings=raw["embeddings"], old_logprobs=raw["seq_logprobs"][:, None].expand(n, 3).clone(),
    )  # fmt: skip
    callback = UncertaintyCallback(method="gcpo", clustering="embedding", tau=0.2)

    class _RolloutModule(_RecordingModule):
        def training_step(self, batch: RolloutBatch, batch_idx: int) -> torch.Tensor:
            self.seen.append((batch, batch.advantage_weights.clone()))
            return (self.layer(batch.embeddings[:, :3]).squeeze(-1) * batch.advantage_weights).pow(2).mean()

    module = _RolloutModule()
    _trainer(tmp_path, callback, max_steps=1).fit(module, _loader([rollout]))
    # seq_logprobs of the RolloutBatch = mean over the 3 equal tokens = raw["seq_logprobs"].
    cluster_ids = embedding_clusters(raw["embeddings"], raw["group_ids"], 0.2)
    signals, _ = uncertainty_signals(
        raw["group_ids"], GROUPS, rewards=raw["rewards"], cluster_ids=cluster_ids,
        embeddings=raw["embeddings"], seq_logprobs=raw["seq_logprobs"],
    )  # fmt: skip
    expected, _ = advantage_weights("gcpo", signals)
    torch.testing.assert_close(module.seen[0][1], expected[raw["group_ids"]])
    assert cluster_ids.max() > 0  # the threshold left more than one cluster somewhere


def test_histograms_go_to_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batches = [_dict_batch(seed) for seed in range(3)]
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = UncertaintyCallback(method="gcpo", log_histograms_every_n_steps=2)
    _trainer(tmp_path, callback, max_steps=3, logger=logger, log_every_n_steps=1).fit(
        _RecordingModule(), _loader(batches)
    )
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()["histograms"]
    expected_tags = {"uncertainty/bot", "uncertainty/se_n", "uncertainty/weight", "uncertainty/u_c", "uncertainty/u"}
    assert expected_tags <= set(tags)
    assert [event.step for event in events.Histograms("uncertainty/bot")] == [0, 2]  # batches 1 and 3
    assert "uncertainty/bot_mean" in events.Tags()["scalars"]


def test_missing_fields_are_named(tmp_path) -> None:
    batch = _dict_batch(0)
    del batch["embeddings"]
    with pytest.raises(KeyError, match="embeddings"):
        _trainer(tmp_path, UncertaintyCallback(method="gcpo"), max_steps=1).fit(_RecordingModule(), _loader([batch]))
    with pytest.raises(ValueError, match="clustering='words'"):
        UncertaintyCallback(clustering="words")


def test_sentence_transformers_source_uses_offline_model(tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    path = resolve_sentence_model(DEFAULT_SENTENCE_MODEL)
    assert path != DEFAULT_SENTENCE_MODEL and path.endswith("model")
    completions = [
        "The answer is four.", "The result is 4.", "Paris is the capital of France.", "Two plus two equals four.",
        "I like green apples.", "Apples that are green are my favourite.", "The sky is blue.", "Quantum physics.",
    ]  # fmt: skip
    batch = {
        "x": torch.randn(8, 3),
        "group_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
        "rewards": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]),
        "completions": completions,
    }
    callback = UncertaintyCallback(method="gcpo", clustering="embedding", embeddings=DEFAULT_SENTENCE_MODEL, tau=0.6)
    module = _RecordingModule()
    _trainer(tmp_path, callback, max_steps=1).fit(module, _loader([batch]))
    # Independent encoding with the same offline model, then the pure functions.
    embeddings = SentenceTransformer(path, device="cpu").encode(completions, convert_to_tensor=True)
    cluster_ids = embedding_clusters(embeddings, batch["group_ids"], 0.6)
    signals, _ = uncertainty_signals(
        batch["group_ids"], 2, rewards=batch["rewards"], cluster_ids=cluster_ids, embeddings=embeddings,
        se_kind="discrete",
    )  # fmt: skip
    expected, _ = advantage_weights("gcpo", signals)
    torch.testing.assert_close(module.seen[0][1], expected[batch["group_ids"]], atol=1e-5, rtol=0)
    assert not math.isclose(expected[0].item(), expected[1].item())  # the two groups differ


def test_correlations_pool_the_groups_since_the_last_diagnostics_step(tmp_path) -> None:
    """With every=3, diagnostics run at batches 1 and 4; the second correlates the 12 groups of batches 2-4."""
    from scipy.stats import pearsonr, spearmanr

    batches = [_dict_batch(seed) for seed in range(4)]
    callback = UncertaintyCallback(method="gcpo", clustering="answer", log_histograms_every_n_steps=3)
    trainer = _trainer(tmp_path, callback, max_steps=4)
    trainer.fit(_RecordingModule(), _loader(batches))
    pooled = [_expected_weights(_dict_batch(seed), "gcpo")[1] for seed in (1, 2, 3)]
    bot = torch.cat([signals["bot"] for signals in pooled]).double().numpy()
    rd = torch.cat([signals["rd"] for signals in pooled]).double().numpy()
    metrics = trainer.logged_metrics
    assert float(metrics["uncertainty/corr_rd/bot_spearman"]) == pytest.approx(spearmanr(bot, rd).statistic, abs=1e-5)
    assert float(metrics["uncertainty/corr_rd/bot_pearson"]) == pytest.approx(pearsonr(bot, rd).statistic, abs=1e-5)
    assert len(callback.window) == 0


def test_precomputed_answer_clusters_are_used_as_given(tmp_path) -> None:
    """A pipeline that already clustered the answers (lit-gcpo's DataModule does, overlapping the scoring pass)
    hands them over as ``answer_clusters``; here they deliberately differ from what ``answers`` would give."""
    batch = _dict_batch(0)
    given = torch.arange(GROUP_SIZE).repeat(GROUPS)  # every completion its own cluster
    callback = UncertaintyCallback(method="seed_grpo", clustering="answer")
    module = _RecordingModule()
    _trainer(tmp_path, callback, max_steps=1).fit(module, _loader([{**batch, "answer_clusters": given}]))
    signals, _ = uncertainty_signals(
        batch["group_ids"], GROUPS, rewards=batch["rewards"], cluster_ids=given, embeddings=batch["embeddings"],
        seq_logprobs=batch["seq_logprobs"],
    )  # fmt: skip
    expected, _ = advantage_weights("seed_grpo", signals)
    torch.testing.assert_close(module.seen[0][1], expected[batch["group_ids"]])
    assert not torch.allclose(module.seen[0][1], _expected_weights(batch, "seed_grpo")[0])
