"""One-step-off-policy rollouts (``data.off_policy``; verl's one_step_off, TRL's async GRPO, NeMo-RL async).

Batch t+1 is generated while batch t trains, with the weights of the step before. At ``on_after_batch_transfer`` of
step t (the optimizer has made t steps, the weights are ``w_t``):

1. take the in-flight rollout of this stream position (submitted at step t-1, sampled with ``w_{t-1}``); at the
   first step of a fit without a saved one, generate it now with ``w_t``;
2. copy ``w_t`` into the engine's own copy of the policy (``SnapshotEngine``; with ``data.engine: vllm``, vLLM's
   weights, ``lit_gcpo.data.off_policy_vllm``);
3. submit the next step's rollout, from the stream position after the batches this one drew, to the worker thread;
4. return batch t, which the module trains on.

So every batch is sampled with weights at most one optimizer step old (``rollout/weight_lag`` is 0 or 1, and
``rollout/weight_version`` is the step whose weights sampled it; with ``num_iterations`` k > 1 a rollout is k
optimizer steps and the lag is k). The prompts of a position and their seeds are those of the synchronous run
(``PromptStream.batch``); the dataloader only clocks the steps. A rollout draws one batch of the stream, or with
``data.dynamic_sampling`` one per round, all in the worker (``lit_gcpo.data.training_rollouts``: positions, several
ranks, the process group of the rounds' exchanges, the checkpoint).

Choices (the papers and peers leave them open):

- **The engine samples from its own copy of the weights**, never from the live module: the optimizer changes the
  module while the worker samples. Its log-probs are the behaviour log-probs (``engine_logprobs``, recorded at
  sampling time) and the batch says ``samples_from_policy=False``, so the loss weighs trainer against engine with
  the module's ``rollout_correction`` mode (item 2; ``sequence_mask`` suits a whole stale sequence).
- **No scoring pass of its own**: with one iteration per rollout the trainer's log-probs under ``w_t`` are those
  of the loss's forward (detached), from which the correction is computed per micro-batch
  (``lit_gcpo.training.loss_step.DeferredCorrection``): one forward pass per step. A pass still runs for
  ``num_iterations`` > 1 and for what must come from the current weights before the step: embeddings (GCPO, from
  the scoring pass under ``w_t``, not from the engine's stale copy) and token summaries, with the old log-probs
  from the same forward, and the reference model's log-probs (beta > 0).
- **Several ranks** (DDP, FSDP2; ``hf``): each rank's worker samples its own shard with its own unsharded copy,
  made when the DataModule is set up, before ``fsdp2`` shards the policy; the weights are gathered in the trainer
  thread once per step; the worker runs no collective on the trainer's process group.
- **Exact resume: the in-flight batch is saved** in the DataModule's state (waited for, its tensors on the CPU),
  every rank's. It cannot be regenerated: that needs the previous step's weights, which the checkpoint does not
  hold.
- **Validation and checkpoints wait** for the in-flight batch; validation samples with the live policy (``hf``), or
  with the same vLLM engine after syncing the current weights (``vllm``).
- **Threads**: torch's thread count is the process's, so the worker's sampling loop leaves it alone (the ``hf``
  engine changes it from the main thread only) and samples on the trainer's threads; ``data.engine_options.
  decode_threads`` is refused when the DataModule is built (``refuse_hf_options``).
- **The ``vllm`` engine** samples in the worker itself (it holds its own copy of the weights; no ``SnapshotEngine``),
  synced from the trainer's thread at the step boundary: ``lit_gcpo.data.off_policy_vllm`` (why a thread, the
  global RNG, what is refused: several ranks, and with ``data.dynamic_sampling``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, replace
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from lit_gcpo.data.batch import PromptBatch, RolloutBatch
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.engines.options import EngineOptions


class SnapshotEngine(HFEngine):
    """The ``hf`` sampling loop over an unsharded copy of the policy on ``device``, loaded by ``sync_weights`` (not
    the live module), so it can sample while the trainer steps. ``weight_version`` is the optimizer step of the
    weights it holds (set by whoever syncs it; -1: the copy's initial weights). The copy is made when the DataModule
    is set up, before ``fsdp2`` shards the policy (``configure_model`` follows ``setup``): a plain module whose forward
    passes are no collectives, as the worker thread needs."""

    samples_from_policy = False

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device, **options: Any) -> None:
        if isinstance(policy, FSDPModule):  # a sharded copy's forward passes would gather from the worker thread
            raise ValueError("data.off_policy copies the policy before fsdp2 shards it: fit a module not yet sharded")
        snapshot = copy.deepcopy(policy)
        if hasattr(snapshot, "merge_and_unload"):  # LoRA: the engine holds merged weights (export_weights' names)
            snapshot = snapshot.merge_and_unload()
        snapshot.requires_grad_(False)
        super().__init__(snapshot.to(device), tokenizer, **options)
        self.weight_version = -1

    @torch.no_grad()
    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the policy's weights (Hugging Face names) into the copy; each of its parameters must be given."""
        own = dict(self.policy.named_parameters())
        missing = set(own)
        for name, tensor in named_parameters:
            if name in own:
                own[name].copy_(tensor)
                missing.discard(name)
        if missing:
            raise ValueError(f"off-policy engine sync: the policy's weights lack {sorted(missing)[:5]}")


def plain_rollout(batch: RolloutBatch) -> dict[str, Any]:
    """``batch`` as plain types with its tensors on the CPU (a checkpoint loaded with ``weights_only``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone()
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return {field.name: plain(getattr(batch, field.name)) for field in fields(RolloutBatch)}


# start position -> (the step's rollout, the stream batches it drew: 1, or a round each with dynamic sampling)
StreamJob = Callable[[int], tuple[RolloutBatch, int]]


class OneStepOff:
    """The in-flight batch and the worker thread that generates it (see the module docstring).

    Args:
        engine: the engine of ``collect`` (its ``weight_version`` is stamped on each batch).
        collect: generates and rewards the groups of one prompt batch (runs in the worker thread).
        device: where a restored in-flight batch's tensors go.
    """

    def __init__(
        self, engine: SnapshotEngine, collect: Callable[[PromptBatch], RolloutBatch], device: torch.device
    ) -> None:
        self.engine, self.collect, self.device = engine, collect, device
        self._executor: ThreadPoolExecutor | None = None
        # (stream position, weight version, its generation: a future of (rollout, batches drawn))
        self._pending: tuple[int, int, Future] | None = None
        self._restored: tuple[int, int, RolloutBatch, int] | None = None  # from a checkpoint, with batches drawn

    def rollout(self, position: int, job: StreamJob, sync: Callable[[], int]) -> tuple[RolloutBatch, int]:
        """The step's rollout from stream ``position`` on and the stream batches it drew (in flight, else ``job``
        now after syncing), after which the engine holds the current weights (``sync`` copies them and returns their
        step) and the next step's ``job``, from the position after those batches, is submitted. Logged with the
        batch: ``rollout/weight_version``, ``rollout/weight_lag`` and ``time/rollout_wait_s``, the seconds the trainer
        thread waited for it (for the worker to finish it; with nothing in flight, its generation): above 0 the
        step is bound by generation, which training no longer hides."""
        start = time.perf_counter()
        taken = self._take(position)
        waited = time.perf_counter() - start
        version = sync()
        self.engine.weight_version = version
        if taken is None:  # the first step of a fit (nothing saved): sampled now, on-policy
            start = time.perf_counter()
            taken = (version, *job(position))
            waited += time.perf_counter() - start
        sampled_with, batch, drawn = taken
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="off-policy-rollout")
        self._pending = (position + drawn, version, self._executor.submit(job, position + drawn))
        batch.metrics["rollout/weight_version"] = float(sampled_with)
        batch.metrics["rollout/weight_lag"] = float(version - sampled_with)
        batch.metrics["time/rollout_wait_s"] = waited
        return batch, drawn

    def _take(self, position: int) -> tuple[int, RolloutBatch, int] | None:
        """The in-flight (or restored) rollout of ``position``: its weight version, batch and batches drawn; None
        when there is none. One of another position (the stream was moved) is dropped."""
        if self._restored is not None:
            (restored, version, batch, drawn), self._restored = self._restored, None
            return (version, batch, drawn) if restored == position else None
        if self._pending is None:
            return None
        (pending_position, version, future), self._pending = self._pending, None
        batch, drawn = future.result()
        return (version, batch, drawn) if pending_position == position else None

    def wait(self) -> None:
        """Block until the in-flight generation is done (before validation, a checkpoint, the end of a fit)."""
        if self._pending is not None:
            self._pending[2].result()

    def close(self) -> None:
        """Wait for the in-flight batch (kept for ``state_dict``) and stop the worker thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def state_dict(self) -> dict[str, Any]:
        """The in-flight batch, saved: ``{position, weight_version, drawn, rollout}`` (empty when there is none)."""
        if self._restored is not None:
            position, version, batch, drawn = self._restored
        elif self._pending is not None:
            position, version, future = self._pending
            batch, drawn = future.result()
        else:
            return {}
        return {"position": position, "weight_version": version, "drawn": drawn, "rollout": plain_rollout(batch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s batch as the next step's (the in-flight generation, if any, is dropped)."""
        self.close()
        self._pending = None
        self._restored = None
        if state:
            rollout = {
                key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in state["rollout"].items()
            }
            components = rollout["reward_components"]
            rollout["reward_components"] = {name: value.to(self.device) for name, value in components.items()}
            drawn = int(state.get("drawn", 1))  # saved before dynamic sampling ran off-policy: one batch a step
            self._restored = (int(state["position"]), int(state["weight_version"]), RolloutBatch(**rollout), drawn)


def refuse_hf_options(options: EngineOptions) -> None:
    """Raise when ``data.engine_options`` holds an ``hf`` option that one-step-off rollouts cannot honour:
    ``decode_threads``, as torch's thread count is the process's and the worker samples while the trainer steps."""
    if options.decode_threads is not None:
        raise ValueError(
            f"data.engine_options.decode_threads {options.decode_threads}: with data.off_policy the worker thread "
            "samples while the trainer steps, and torch's thread count is the process's, so the worker leaves it as "
            "it is (it samples on the trainer's threads: set OMP_NUM_THREADS to split the cores); leave "
            "decode_threads unset"
        )


def one_step_off(data: Any, module: Any) -> OneStepOff:
    """The ``OneStepOff`` of the ``RolloutDataModule`` ``data`` (set up, its collector built) whose LightningModule is
    ``module``, for the ``hf`` engine: a ``SnapshotEngine`` of the policy on the module's device with the ``hf``
    engine options (``lit_gcpo.data.off_policy_vllm`` builds the ``vllm`` engine's)."""
    engine = SnapshotEngine(module.policy, module.tokenizer, module.device, **data.engine_options.for_engine("hf"))
    return worker_rollouts(data, module, engine)


def worker_rollouts(data: Any, module: Any, engine: Any) -> OneStepOff:
    """The ``OneStepOff`` whose worker samples with ``engine`` (it has ``weight_version`` and ``sync_weights``): a
    collector like ``data``'s (same tokenizer, rewards, prompts' special tokens) that samples a prompt batch as the
    synchronous run does (the same per-position seeds), without embeddings (the scoring pass computes them under the
    current weights)."""
    if module.loss_step.rollout_correction is None:  # the stale batch would be trained as if on-policy
        raise ValueError("data.off_policy needs model.rollout_correction (e.g. sequence_mask); it is None")
    own = data.collector
    collector = RolloutCollector(engine, own.tokenizer, own.rewards, own.add_special_tokens, own.accuracy_reward)
    sampling, device = replace(data.sampling, seed=None), module.device

    def collect(prompts: PromptBatch) -> RolloutBatch:
        seeds = data.prompt_seeds("train", prompts)
        # the training reward set (label-free training has its own: lit_gcpo.data.label_free)
        return collector.collect(
            prompts, data.group_size, sampling, device, seeds, with_embeddings=False, rewards=data.train_rewards
        )

    return OneStepOff(engine, collect, device)
