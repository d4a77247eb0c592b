"""Run by tests/test_ddp.py: one fit on the CPU with 1 process or 2 (gloo), each rank saving its final weights.

    python ddp_run.py MODEL_DIR OUT_DIR '{"devices": 2, "strategy": "ddp", ...}'

Options (JSON): devices, strategy (auto / ddp / fsdp2), batch_size (prompts per rank), max_steps (optimizer
steps), max_grad_norm, poison_rollout (the rollout whose second half of completions gets NaN old log-probs:
on 2 ranks that is all of rank 1's), save (a checkpoint path written at the end), resume (a checkpoint to
resume from), momentum (of the SGD optimizer, 0.5; 0 keeps no optimizer state), warmup_steps, tag (the output
file's prefix), rewards (the reward functions, default digit_fraction), dynamic (data.dynamic_sampling's settings, a
dict; then every trained batch and its rollout metrics are saved under "trained"), high_entropy_rho
(model.token_selection HighEntropyTokens with this rho), off_policy (data.off_policy), reward_model (the path of a
reward model added to the rewards as "rm"). With 2 devices Lightning re-runs
this script for rank 1.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch

from lit_gcpo.algorithms.token_selection import HighEntropyTokens
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.rewards import RewardModel
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.module import GRPOModule


def sgd(params, momentum: float = 0.5):
    # momentum 0 (plain SGD) saves no optimizer state, on which Lightning's own FSDP2 loader fails
    return torch.optim.SGD(params, lr=0.1, momentum=momentum)


class Poison(L.Callback):
    """NaN old log-probs on the second half of the global batch of one rollout (all of rank 1's on 2 ranks)."""

    def __init__(self, rollout: int) -> None:
        self.rollout = rollout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.datamodule.consumed_batches - 1 != self.rollout:
            return
        n = batch.old_logprobs.shape[0]
        rows = slice(0, n) if trainer.world_size == 2 and trainer.global_rank == 1 else slice(n // 2, n)
        if trainer.world_size == 1 or trainer.global_rank == 1:
            batch.old_logprobs[rows] = float("nan")


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


class RecordingModule(GRPOModule):
    """Keeps, of every batch ``training_step`` receives, what the dynamic-sampling tests inspect."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trained: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.trained.append(
            {
                "prompts": list(batch.prompts),
                "completions": list(batch.completions),
                "rewards": batch.rewards.clone(),
                "group_ids": batch.group_ids.clone(),
                "advantage_weights": None if batch.advantage_weights is None else batch.advantage_weights.clone(),
                "metrics": {k: v for k, v in batch.metrics.items() if k.startswith("rollout/")},
            }
        )
        return super().training_step(batch, batch_idx)


class CountAllReduces(L.Callback):
    """Counts DDP's gradient all-reduce calls (one per bucket per synced backward)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(trainer.strategy.model, DistributedDataParallel):
            return

        def counting(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting)


if __name__ == "__main__":
    model_dir, out_dir, options = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    L.seed_everything(0)
    module = RecordingModule(
        model=model_dir,
        optimizer=functools.partial(sgd, momentum=options.get("momentum", 0.5)),
        num_iterations=2,
        warmup_steps=options.get("warmup_steps", 0),
        micro_batch_size=5,
        max_grad_norm=options.get("max_grad_norm", 0.0),
        beta=options.get("beta", 0.0),
        advantage_scale="batch",
        token_selection=HighEntropyTokens(options["high_entropy_rho"]) if "high_entropy_rho" in options else None,
        log_samples_every_n_steps=0,
        export_dir=None,
    )
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=64, num_val=8, seed=1),
        batch_size=options["batch_size"],
        group_size=4,
        rewards=options.get("rewards", ["toy_rewards:digit_fraction"])
        + ([RewardModel(options["reward_model"], name="rm")] if "reward_model" in options else []),
        accuracy_reward=None,
        sampling=SamplingConfig(max_new_tokens=6),
        seed=3,
        dynamic_sampling=options.get("dynamic"),
        off_policy=options.get("off_policy", False),
    )
    counter = CountAllReduces()
    callbacks: list[L.Callback] = [counter]
    recorder = RecordFirstBatch()
    if options.get("uncertainty"):
        from lit_gcpo.callbacks import UncertaintyCallback

        callbacks += [UncertaintyCallback(method="gcpo", clustering="embedding", embeddings="batch", tau=0.9), recorder]
    if options.get("poison_rollout") is not None:
        callbacks.append(Poison(options["poison_rollout"]))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=options["devices"],
        strategy=options.get("strategy", "auto"),
        precision=options.get("precision", "32-true"),
        max_steps=options["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(out_dir),
        callbacks=callbacks,
    )
    trainer.fit(module, data, ckpt_path=options.get("resume"))
    if options.get("save"):
        trainer.save_checkpoint(options["save"])
    weights = dict(module.export_weights())  # full tensors (FSDP shards gathered: every rank calls it)
    torch.save(
        {
            "weights": {n: w.detach().clone() for n, w in weights.items()},
            "consumed": data.consumed_batches,
            "global_step": trainer.global_step,
            "skipped": module.skipped_steps,
            "allreduces": counter.calls,
            "loss": float(trainer.logged_metrics["train/loss"]),
            "first_batch": recorder.record,
            "trained": module.trained,
        },
        out_dir / f"{options.get('tag', 'run')}-rank{trainer.global_rank}.pt",
    )
