"""The declared interfaces between components: implemented by lit-gcpo's own classes, and a component that lacks
a member is refused in ``setup`` with an error naming every missing one."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_training import CaptureBatches, make_pair, trainer

from lit_gcpo.data.contracts import EvaluationData, RolloutPolicy, check_implements, missing_members, protocol_members
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.evaluation.callback import BenchmarkReport
from lit_gcpo.tasks.arithmetic import ArithmeticTask


class _TokenizerOnly(L.LightningModule):
    """Has the tokenizer and the policy, but neither exports weights nor scores rollouts."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = torch.nn.Linear(2, 2)
        self.tokenizer = object()


def test_members_are_read_from_the_protocol():
    assert protocol_members(RolloutPolicy) == [
        "tokenizer",
        "policy",
        "device",
        "export_weights",
        "precision_context",
        "score_rollout",
    ]
    assert set(protocol_members(EvaluationData)) == {
        "val_batch_size",
        "seed",
        "test_names",
        "eval_settings",
        "test_prompts",
        "skipped_items",
        "too_long_items",
        "skip_test_batches",
    }


def test_lit_gcpo_classes_implement_the_protocols(tiny_model_dir):
    module, data = make_pair(tiny_model_dir)
    assert missing_members(module, RolloutPolicy) == []
    assert missing_members(data, EvaluationData) == []


def test_datamodule_names_what_the_module_lacks():
    data = RolloutDataModule(train=ArithmeticTask("train", num_train=8, num_val=2))
    data.trainer = SimpleNamespace(lightning_module=_TokenizerOnly())
    with pytest.raises(
        TypeError, match=r"_TokenizerOnly lacks export_weights, precision_context, score_rollout: .*RolloutPolicy"
    ):
        data.setup("fit")


def test_benchmark_report_names_what_the_datamodule_lacks(tmp_path):
    datamodule = SimpleNamespace(val_batch_size=4, seed=0, test_names=list)
    trainer = SimpleNamespace(datamodule=datamodule)
    missing = r"lacks eval_settings, test_prompts, skipped_items, too_long_items, skip_test_batches"
    with pytest.raises(TypeError, match=missing):
        BenchmarkReport(output_dir=str(tmp_path)).setup(trainer, None, "test")


def test_check_passes_a_complete_implementation(tiny_model_dir):
    module, _ = make_pair(tiny_model_dir)
    check_implements(module, RolloutPolicy, "the module")  # no error


def test_clustering_thread_lives_from_setup_to_teardown(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir, lr=0.0)
    capture = CaptureBatches()  # asks for answer_clusters: the thread clusters every batch
    trainer(tmp_path, 2, callbacks=[capture]).fit(module, data)
    assert all("time/answer_clusters_s" in batch.metrics for batch in capture.batches)
    assert all(batch.answer_clusters is not None for batch in capture.batches)
    assert data._executor is None
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("answer-clusters")]
