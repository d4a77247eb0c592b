"""The embedded QA task: generated rows, a tiny policy built for it, and a real Trainer run in which the
embedding-clustering path (sentence-transformer embeddings of free-text answers) sets the advantage weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_gcpo.algorithms.clustering import embedding_clusters
from lit_gcpo.algorithms.embeddings import DEFAULT_SENTENCE_MODEL, SentenceEncoder
from lit_gcpo.algorithms.uncertainty import advantage_weights, uncertainty_signals
from lit_gcpo.callbacks import UncertaintyCallback
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.rewards import qa_f1
from lit_gcpo.tasks.hotpotqa import HotpotQA
from lit_gcpo.tasks.qa import COLOURS, QA_VOCAB, EmbeddedQATask, build_qa_policy, qa_problems
from lit_gcpo.training.module import GRPOModule

REPO = Path(__file__).parents[1]


def test_rows_answer_the_question_with_synonyms_as_references() -> None:
    problems = qa_problems(200, seed=4)
    assert problems == qa_problems(200, seed=4) != qa_problems(200, seed=5)
    for problem in problems:
        name, colour, thing = problem.facts[problem.asked]
        assert f"{name} has a {colour} {thing}." in problem.prompt and problem.prompt.endswith(f"{name}'s {thing}? ")
        assert problem.references == [colour, *COLOURS[colour]]
        assert set(problem.prompt) <= set(QA_VOCAB)
    # qa_f1 rewards the colour and its near-synonyms alike, and another fact's colour not at all
    row = problems[0].to_row()
    other = next(c for _, c, _ in problems[0].facts if c != row["colour"])
    synonym = COLOURS[row["colour"]][0]
    assert qa_f1(["p"] * 3, [row["colour"], synonym, other], answer=[row["answer"]] * 3) == [1.0, 1.0, 0.0]
    train = EmbeddedQATask("train", num_train=50, num_val=10, seed=2).load()
    val = EmbeddedQATask("validation", num_train=999, num_val=10, seed=2).load()
    assert len(train) == 50 and val == EmbeddedQATask("validation", num_train=50, num_val=10, seed=2).load()
    with pytest.raises(ValueError, match="num_facts"):
        EmbeddedQATask(num_facts=9)


@pytest.fixture(scope="module")
def qa_policy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-qa")
    # 150 steps: at 60 the policy answered none of 72 sampled completions right once the sampler was seeded
    # per prompt, and a batch without reward spread trains nothing
    build_qa_policy(path, sft_steps=150, seed=0)
    return str(path)


class _Record(L.Callback):
    """What the uncertainty callback read and wrote, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(
            {
                "completions": list(batch.completions),
                "group_ids": batch.group_ids.clone(),
                "rewards": batch.rewards.clone(),
                "seq_logprobs": batch.seq_logprobs.clone(),
                "weights": batch.advantage_weights.clone(),
            }
        )


def test_embedded_qa_trains_through_the_embedding_clustering_path(qa_policy, tmp_path) -> None:
    torch.manual_seed(0)
    module = GRPOModule(
        model=qa_policy, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), log_samples_every_n_steps=0, export_dir=None
    )
    initial = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    data = RolloutDataModule(
        train=EmbeddedQATask("train", num_train=64, num_val=8, seed=1),
        batch_size=6,
        group_size=4,
        rewards=["qa_f1"],
        accuracy_reward="qa_f1",
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        seed=2,
    )
    callback = UncertaintyCallback(method="gcpo", clustering="embedding", embeddings=DEFAULT_SENTENCE_MODEL, tau=0.85)
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
        callbacks=[callback, record],
    )  # fmt: skip
    trainer.fit(module, data)
    assert len(record.batches) == 3 and callback.groups_seen == 18
    # the policy answers in words: some groups mix right and wrong answers, so there is something to learn
    rewards = torch.cat([b["rewards"] for b in record.batches])
    assert 0 < float(rewards.mean()) < 1
    # the weights the module used are the pure functions over the sentence-transformer's embeddings
    encoder = SentenceEncoder(DEFAULT_SENTENCE_MODEL)
    moved = 0
    for batch in record.batches:
        embeddings = encoder.encode(batch["completions"])
        group_ids = batch["group_ids"]
        signals, _ = uncertainty_signals(
            group_ids, 6, rewards=batch["rewards"], cluster_ids=embedding_clusters(embeddings, group_ids, 0.85),
            embeddings=embeddings, seq_logprobs=batch["seq_logprobs"],
        )  # fmt: skip
        expected, _ = advantage_weights("gcpo", signals)
        torch.testing.assert_close(batch["weights"], expected[group_ids], atol=1e-4, rtol=1e-4)
        moved += int((expected - 1).abs().max() > 1e-3)
    assert moved > 0  # the weights are not all 1: the geometry changed the update
    changed = [n for n, p in module.policy.named_parameters() if not torch.allclose(p.detach(), initial[n])]
    assert len(changed) == len(initial)  # every parameter trained


def test_gcpo_qa_config_parses_and_hotpotqa_rows_load(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", "configs/gcpo_qa.yaml", "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lit_gcpo.tasks.hotpotqa.HotpotQA" in done.stdout and "clustering: embedding" in done.stdout
    rows = HotpotQA(path=str(REPO / "tests/fixtures/benchmarks/hotpotqa_dev_distractor.sample.jsonl")).load()
    assert rows and all(row["prompt"] and row["context"] and row["gold"] for row in rows)
    assert qa_f1(["p"], [f"\\boxed{{{rows[0]['gold'][0]}}}"], gold=[rows[0]["gold"]]) == [1.0]
