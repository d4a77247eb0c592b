"""One-step-off-policy rollouts from the colocated vLLM engine (``data.off_policy`` with ``data.engine: vllm``).

The schedule, the in-flight batch saved in the checkpoint and the waits before validation and checkpoints are those
of ``lit_gcpo.data.off_policy`` (``OneStepOff``); what differs is the engine. vLLM already holds its own copy of the
weights, so no ``SnapshotEngine`` is made: the DataModule's ``VLLMEngine`` samples batch t+1 in the worker thread
while batch t trains. At step t, in the trainer's thread, ``OneStepOff.rollout`` takes the in-flight batch (sampled
with ``w_{t-1}``; the worker is idle from then on), loads ``w_t`` into vLLM (``sync_weights``: ``reload_weights`` from
memory, the prefix cache emptied), then submits the generation of position t+1. So vLLM never samples while it
receives weights and is never driven by two threads at once: the DataModule skips its own per-step sync while
training off-policy, and validation waits for the in-flight batch before it syncs and samples with the same engine
(with that wait removed, validation sampling beside the worker hung the fit; the engine now refuses a call that
overlaps another one's, ``lit_gcpo.engines.vllm_guards``).

Choices (vLLM and the peers leave them open):

- **A thread, not a process.** ``LLM.generate`` of the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
  colocated engine's mode) steps vLLM's engine core in the calling thread; driven from the worker thread on vLLM
  0.32's CPU build it gives the batches a plain call gives (``tests/vllm_engine/test_vllm_off_policy.py``). vLLM's
  engine core in its own process would receive every sync serialised (measured on the CPU: 0.35-1.8 s for 18M
  parameters, against 0.06 s in-process); a separate inference GPU would take the weights over NCCL (vLLM's weight
  transfer API, GPU only), not built here.
- **The global RNG.** The synchronous engine saves and restores the process's RNG states around ``generate``; in the
  worker that restore would rewind the trainer's own draws made meanwhile, so the worker generates with
  ``keep_global_rng=False``, every prompt with its seed (its stream position's). vLLM's CPU sampler still draws one
  number per row and decoding step from the global torch generator (and replaces it by the seeded request's own):
  the tokens do not depend on it, but a trainer that draws from the global generator during a step (dropout, off by
  default: ``model.disable_dropout``) gets other numbers than in a synchronous run.
- **The behaviour log-probs** are vLLM's sampling log-probs (``processed_logprobs``), the batch says
  ``samples_from_policy=False`` and the loss corrects with ``model.rollout_correction`` as in the synchronous vLLM
  run; there, too, the engine's numerics differ from the trainer's, here the weights are one step old as well.
- **Refused** (when the DataModule is built): ``data.engine_options.sync_every`` other than 1 (the lag would be up
  to k steps, and ``rollout/weight_version`` would name weights vLLM does not hold) and ``enable_sleep_mode`` (the
  engine samples while the trainer steps: there is no idle phase to free its memory in); at setup, several ranks
  (each would drive its own engine from its worker; not built or tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lit_gcpo.data.off_policy import OneStepOff, worker_rollouts
from lit_gcpo.engines.base import Generation, RolloutEngine, SamplingConfig
from lit_gcpo.engines.options import EngineOptions


class WorkerThreadVLLM(RolloutEngine):
    """The DataModule's ``VLLMEngine`` as the off-policy worker drives it: ``generate`` leaves the global RNG states
    alone (every prompt needs its seed), ``sync_weights`` loads at every call. ``weight_version`` is the optimizer
    step of the weights vLLM holds (set by whoever syncs it; -1: those it started from)."""

    samples_from_policy = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.weight_version = -1

    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> Generation:
        return self.engine.generate(prompt_ids, num_samples, sampling, seeds, keep_global_rng=False)

    def sync_weights(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.sync_weights(named_parameters, force=True)


def refuse_vllm_options(options: EngineOptions) -> None:
    """Raise when ``data.engine_options`` holds a ``vllm`` option that one-step-off rollouts cannot honour."""
    if options.sync_every not in (None, 1):
        raise ValueError(
            f"data.engine_options.sync_every {options.sync_every}: data.off_policy loads the weights into vLLM at "
            "every step (one step of lag); leave it unset or 1"
        )
    if options.enable_sleep_mode:
        raise ValueError(
            "data.engine_options.enable_sleep_mode: with data.off_policy vLLM samples while the trainer steps, "
            "so it has no idle phase to sleep in; leave it unset or false"
        )


def one_step_off_vllm(data: Any, module: Any) -> OneStepOff:
    """The ``OneStepOff`` of the ``RolloutDataModule`` ``data`` (set up, its ``vllm`` collector built) whose
    LightningModule is ``module``, sampling with ``data``'s own ``VLLMEngine`` in the worker thread."""
    if data.trainer.world_size > 1:
        raise ValueError(
            f"data.off_policy with data.engine vllm runs on one process only (world size {data.trainer.world_size})"
        )
    return worker_rollouts(data, module, WorkerThreadVLLM(data.collector.engine))
