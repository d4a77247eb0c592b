"""A training step's rollout in the ``RolloutDataModule``: drawn from the prompt stream at the step, with or without
dynamic sampling, or one step off-policy (``data.off_policy``) on one or several ranks.

``TrainingRollouts`` draws a step's rollout with the DataModule's engine (``lit_gcpo.data.dynamic_sampling``'s
``stream_rollout``), or hands it to ``OffPolicyRollouts``. ``lit_gcpo.data.off_policy`` generates the next step's
batch in a worker thread with its own copy of the policy; ``OffPolicyRollouts`` is the DataModule's side of that:
which batches of the prompt stream a step's rollout is drawn from, the weight copy, the process group the worker
exchanges over, and the in-flight batches in the checkpoint.

- **Positions.** A step's rollout is drawn from this rank's stream batches from ``consumed_batches`` on: one batch,
  or with ``data.dynamic_sampling`` one per round (``lit_gcpo.data.dynamic_sampling.stream_rollout``). The next
  step's starts after them, so the worker's job for step t+1 is known as soon as step t's batch is taken, and
  ``consumed_batches`` points at the in-flight batch's first position, as it points at the next step's batch in a
  synchronous run.
- **Several ranks (DDP, FSDP2; the ``hf`` engine).** Each rank's worker samples its own shard of the next position
  (``PromptStream`` shards by rank, each prompt from its position's seed) with the same weights as every other
  rank's, so together they sample what one process with the global batch size samples. The weights are copied in
  the trainer thread at the start of a step (``on_after_batch_transfer``, every rank, while the worker is idle):
  under FSDP2 ``export_weights`` gathers the shards, a collective, once per step. The worker's forward passes are
  those of a plain module: no collectives. (The ``vllm`` engine's off-policy worker runs on one process only:
  ``lit_gcpo.data.off_policy_vllm``.)
- **Dynamic sampling** runs in the worker: its per-round ``all_gather``s go over a gloo process group created at
  setup for the worker (``torch.distributed.new_group``), never over the default group, on which the trainer
  thread's collectives (DDP's gradient all-reduce, FSDP2's gathers, metric reductions) run meanwhile. Every rank's
  worker issues the same gathers in the same order, which is all a group's collectives need.
- **Checkpoint.** Lightning writes rank 0's DataModule state, so ``state_dict`` gathers every rank's in-flight batch
  (over the same group, once this rank's worker is done: the order of the group's collectives is the same on every
  rank) and each rank restores its own. With another number of ranks the saved batches are dropped (warned) and the
  first step samples its own, with the current weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lit_gcpo.data.batch import PromptBatch, RolloutBatch
from lit_gcpo.data.dynamic_sampling import TorchExchange, stream_rollout
from lit_gcpo.data.off_policy import one_step_off
from lit_gcpo.data.off_policy_vllm import one_step_off_vllm

# this rank's batch i of the training stream (``PromptStream.batch``)
StreamBatches = Callable[[int], PromptBatch]


class TrainingRollouts:
    """The training rollouts of ``data`` (a ``RolloutDataModule`` in ``setup`` of a fit, its collector built), whose
    LightningModule is ``module``: each step's drawn with ``data``'s engine and the current weights, or one step
    off-policy when ``data.off_policy`` is set."""

    def __init__(self, data: Any, module: Any) -> None:
        self.data = data
        self.off_policy = OffPolicyRollouts(data, module) if data.off_policy else None

    def draw(
        self, position: int, batch: PromptBatch, prompts: StreamBatches, policy: Any, embed: bool
    ) -> tuple[RolloutBatch, int]:
        """The step's scored groups from this rank's stream batch ``position`` on, and how many batches they took:
        ``batch`` (the dataloader's, which is batch ``position``), or with dynamic sampling those of the batches it
        draws (the dataloader fetched ``batch`` before the last step's rounds), or one step off-policy those sampled
        during the last step. ``policy``: the ``RolloutPolicy``; ``embed``: the engine gathers embeddings."""
        if self.off_policy is not None:
            return self.off_policy.next_rollout(position, prompts, policy.export_weights)
        data = self.data
        collector, sampling = data.collector, replace(data.sampling, seed=None)

        def collect(prompts_batch: PromptBatch) -> RolloutBatch:
            seeds = data.prompt_seeds("train", prompts_batch)
            return collector.collect(
                prompts_batch, data.group_size, sampling, policy.device, seeds, embed, rewards=data.train_rewards
            )

        if data.dynamic_sampling is None:
            result = collect(batch), 1
        else:
            ranks = TorchExchange(data.trainer.global_rank, data.trainer.world_size)
            settings, pad = data.dynamic_sampling, collector.pad_token_id
            result = stream_rollout(position, collect, prompts, settings, data.batch_size, ranks, pad)
        collector.engine.sleep()  # vLLM sleep mode frees its memory for the optimizer steps
        return result

    def wait(self) -> None:
        """Block until the in-flight rollout, if any, is sampled (before evaluation samples)."""
        if self.off_policy is not None:
            self.off_policy.wait()

    def close(self) -> None:
        """Stop the off-policy worker, if any, its in-flight rollout kept for ``state_dict``."""
        if self.off_policy is not None:
            self.off_policy.close()

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's in-flight rollout (``OffPolicyRollouts.state_dict``); none when synchronous."""
        return [] if self.off_policy is None else self.off_policy.state_dict()

    def load_state_dict(self, saved: list[dict[str, Any]] | dict[str, Any]) -> None:
        if self.off_policy is not None:
            self.off_policy.load_state_dict(saved)


class OffPolicyRollouts:
    """The one-step-off rollouts of ``data`` (a ``RolloutDataModule`` in ``setup`` of a fit, its collector built),
    whose LightningModule is ``module`` (see the module docstring)."""

    def __init__(self, data: Any, module: Any) -> None:
        self.rank, self.world_size = data.trainer.global_rank, data.trainer.world_size
        # every rank creates it here, in the same order relative to any other group (a collective)
        self.group = torch.distributed.new_group(backend="gloo") if self.world_size > 1 else None
        self.flight = (one_step_off_vllm if data.engine_name == "vllm" else one_step_off)(data, module)
        self.dynamic_sampling, self.batch_size = data.dynamic_sampling, data.batch_size
        self.pad_token_id = data.collector.pad_token_id
        self.trainer = data.trainer

    def next_rollout(
        self, position: int, prompts: StreamBatches, export_weights: Callable[[], Any]
    ) -> tuple[RolloutBatch, int]:
        """This step's rollout from this rank's stream batch ``position`` on (``prompts(i)``: its batch ``i``) and how
        many batches it drew; the engine then holds the policy's current weights (``export_weights``: its named
        full tensors, a collective under FSDP2) and the next step's rollout is submitted to the worker."""
        exchange = TorchExchange(self.rank, self.world_size, self.group)
        flight = self.flight

        def job(start: int) -> tuple[RolloutBatch, int]:
            settings, pad = self.dynamic_sampling, self.pad_token_id
            return stream_rollout(start, flight.collect, prompts, settings, self.batch_size, exchange, pad)

        def sync() -> int:
            flight.engine.sync_weights(export_weights())
            return self.trainer.global_step

        return flight.rollout(position, job, sync)

    def wait(self) -> None:
        """Block until the in-flight rollout is sampled (before evaluation samples)."""
        self.flight.wait()

    def close(self) -> None:
        """Wait for the in-flight rollout (kept for ``state_dict``) and stop the worker thread."""
        self.flight.close()

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's in-flight rollout in rank order (``{}`` for none); on several ranks a collective."""
        mine = self.flight.state_dict()  # waits for this rank's worker
        if self.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def load_state_dict(self, saved: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Restore this rank's in-flight rollout of ``state_dict``'s list (a dict: one process's, as saved before
        several ranks ran off-policy); dropped when the number of ranks differs."""
        states = [saved] if isinstance(saved, dict) else list(saved)
        if len(states) != self.world_size:
            if any(states):
                rank_zero_warn(
                    f"data.off_policy: the checkpoint holds the in-flight batches of {len(states)} rank(s), this run "
                    f"has {self.world_size}: they are dropped, and the first step samples its own batch"
                )
            self.flight.load_state_dict({})
            return
        self.flight.load_state_dict(states[self.rank])
