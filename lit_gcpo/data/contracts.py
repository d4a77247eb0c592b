"""The services one component asks of another, declared once and checked once (in ``setup``).

Data flows one way: the rollout DataModule builds a ``RolloutBatch`` (``lit_gcpo.data.batch``) that carries everything
the module and the callbacks read. Where a component needs another's *service* (not data), it is named here:

- ``RolloutPolicy``: what the rollout DataModule asks of the LightningModule: the tokenizer and the policy the
  engine is built from, the device batches go to, the policy's weights for the engine's sync, the precision its
  forward passes run in (an engine sampling from the policy itself samples in it), and the scoring pass that fills
  the batch's fields only the policy can compute (old and reference log-probs, embeddings).
- ``EvaluationData``: what the ``BenchmarkReport`` callback asks of the DataModule: how each evaluation pass is
  named, sampled and batched, its prompts, the items its sources left out, and leaving out the batches an
  interrupted run finished.

:func:`check_implements` raises a ``TypeError`` that names every missing member, instead of an
``AttributeError`` deep inside a step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.engines.base import SamplingConfig


@runtime_checkable
class RolloutPolicy(Protocol):
    """The LightningModule as the rollout DataModule uses it (``GRPOModule`` implements it).

    Attributes:
        tokenizer: the policy's tokenizer (prompts are rendered and tokenised with it).
        policy: the transformers model the engine generates with (``hf``) or copies (``vllm``).
    """

    tokenizer: Any
    policy: torch.nn.Module

    @property
    def device(self) -> torch.device:
        """Where the batches' tensors go."""
        ...

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full weights with Hugging Face names, for the engine's sync (a collective under FSDP2)."""
        ...

    def precision_context(self) -> AbstractContextManager[Any]:
        """The context the policy's forward passes run in (the trainer's precision: autocast under bf16-mixed)."""
        ...

    def score_rollout(
        self, batch: RolloutBatch, with_reference: bool = True, fields: Collection[str] | None = None
    ) -> None:
        """Fill the fields of ``batch`` that need the policy's forward pass, of those in ``fields``."""
        ...


@runtime_checkable
class EvaluationData(Protocol):
    """The DataModule as the ``BenchmarkReport`` callback reads it (``RolloutDataModule`` implements it).

    Attributes:
        val_batch_size: prompts per evaluation batch.
        seed: the seed the evaluation samplers are derived from.
    """

    val_batch_size: int
    seed: int | None

    def test_names(self) -> list[str]:
        """A name for each test dataloader (benchmark, and ``/<variant>`` for a pass)."""
        ...

    def eval_settings(self, dataloader_idx: int) -> tuple[SamplingConfig, int]:
        """How evaluation dataloader ``dataloader_idx`` samples: ``(sampling, completions per prompt)``."""
        ...

    def test_prompts(self) -> dict[str, list[str]]:
        """The prompts of each test dataloader, by its name."""
        ...

    def skipped_items(self, stage: str) -> dict[str, list[str]]:
        """Ids of the items the evaluation sources of ``stage`` left out (an unreadable gold), by benchmark."""
        ...

    def too_long_items(self, stage: str) -> dict[str, list[str]]:
        """Ids of the items of ``stage`` left out for a prompt longer than the context, by benchmark."""
        ...

    def skip_test_batches(self, done: dict[str, set[tuple[int, ...]]]) -> None:
        """Leave out of the test dataloaders the batches an interrupted run evaluated."""
        ...


def protocol_members(protocol: type) -> list[str]:
    """The public attributes, properties and methods ``protocol`` declares, in declaration order."""
    declared = [name for name in vars(protocol) if not name.startswith("_")]
    annotated = [name for name in vars(protocol).get("__annotations__", {}) if name not in declared]
    return annotated + declared


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks."""
    present = set(dir(obj))
    return [name for name in protocol_members(protocol) if name not in present]


def check_implements(obj: object, protocol: type, role: str) -> None:
    """Raise a ``TypeError`` naming each member of ``protocol`` that ``obj`` (playing ``role``) lacks."""
    missing = missing_members(obj, protocol)
    if missing:
        raise TypeError(
            f"{role} {type(obj).__name__} lacks {', '.join(missing)}: it must implement "
            f"lit_gcpo.data.contracts.{protocol.__name__}"
        )
