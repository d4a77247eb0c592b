"""Run by tests/test_ddp.py: a 2-process DDP fit on the CPU (gloo), each rank saving its final weights."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from lit_gcpo.callbacks import UncertaintyCallback
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.data.sources import ArithmeticTask
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.module import GRPOModule


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class RecordFirstBatch(L.Callback):
    """Keeps what the uncertainty callback read and wrote on this rank's first batch (test_ddp checks the
    weights against the pure functions on both ranks' batches concatenated)."""

    def __init__(self) -> None:
        self.record = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.record is None:
            self.record = {
                "group_ids": batch.group_ids.clone(),
                "rewards": batch.rewards.clone(),
                "embeddings": batch.embeddings.clone(),
                "seq_logprobs": batch.seq_logprobs.clone(),
                "advantage_weights": batch.advantage_weights.clone(),
                "weight_std": float(trainer.callback_metrics["uncertainty/weight_std"]),
            }


if __name__ == "__main__":
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0)
    module = GRPOModule(
        model=model_dir,
        optimizer=sgd,
        num_iterations=2,
        micro_batch_size=5,
        max_grad_norm=1.0,
        log_samples_every_n_steps=0,
        export_dir=None,
    )
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=64, num_val=8, seed=1),
        batch_size=3,
        group_size=4,
        rewards=["toy_rewards:digit_fraction"],
        accuracy_reward=None,
        sampling=SamplingConfig(max_new_tokens=6),
        seed=3,
    )
    callback = UncertaintyCallback(method="gcpo", clustering="embedding", embeddings="batch", tau=0.9)
    recorder = RecordFirstBatch()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(out_dir),
        callbacks=[callback, recorder],
    )
    trainer.fit(module, data)
    rank = trainer.global_rank
    torch.save(
        {
            "weights": {n: p.detach() for n, p in module.policy.named_parameters()},
            "consumed": data.consumed_batches,
            "global_step": trainer.global_step,
            "loss": float(trainer.logged_metrics["train/loss"]),
            "first_batch": recorder.record,
        },
        out_dir / f"rank{rank}.pt",
    )
