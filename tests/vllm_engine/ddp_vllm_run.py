"""Run by test_vllm_ddp.py: a 2-rank DDP fit (gloo, CPU) with one colocated vLLM engine per rank.

Each rank records, at every step, the prompts it generated for and the largest difference between its engine's
sampled-token log-probs and its trainer's (the scoring pass right after the engine was synced).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L
import torch

from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.module import GRPOModule


class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def rollout_fields(self, stage: str) -> set[str]:
        return {"old_logprobs"} if stage == "train" else set()  # with one iteration, scored only when asked

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask = batch.completion_mask.bool()
        gap = (batch.engine_logprobs - batch.old_logprobs)[mask].abs().max().item()
        self.steps.append({"step": trainer.global_step, "prompts": list(batch.prompts), "gap": gap})


def adam(params):
    return torch.optim.AdamW(params, lr=3e-3)


if __name__ == "__main__":
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    module = GRPOModule(model=model_dir, optimizer=adam, log_samples_every_n_steps=0, export_dir=None)
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=64, num_val=8, seed=1),
        batch_size=4,
        group_size=4,
        rewards=["math_accuracy"],
        engine="vllm",
        engine_options={"dtype": "float32", "max_model_len": 256},
        sampling=SamplingConfig(max_new_tokens=12),
        seed=3,
    )
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, data)
    torch.save(
        {"steps": record.steps, "weights": {n: p.detach().clone() for n, p in module.policy.state_dict().items()}},
        out_dir / f"rank{trainer.global_rank}.pt",
    )
