"""The GRPO-family LightningModule: a policy (and, when beta > 0, a frozen reference) trained on rollouts.

The math lives in ``lit_gcpo.algorithms`` (advantages, losses, rollout correction, log-probs), the pieces of a
step in their own files of this package: ``loss_step`` (the loss settings; a step's advantages, mask, counts and
rollout-correction weights; one micro-batch's loss), ``rollout_scoring`` (which no-grad passes a fresh rollout
needs), ``scoring`` (the log-prob forward), ``reference``, ``optimizer_step`` (the guarded step and the default
schedule), ``step_metrics`` (merging metrics over micro-batches and ranks, and logging a step), ``validation`` (the
evaluation batches' logs, the starting policy's baseline, the validation history), ``parallel`` (FSDP2 and gradient
sync). This class is the list of Lightning hooks that orders them.

Everything the step reads about its batch comes with the ``RolloutBatch``: how it was sampled (the temperature
whose distribution the log-probs are recomputed under, ``L_max``, whether the engine is the policy itself) and
which completions are correct; the module keeps no copy of the sampling settings and never reads the DataModule.

- ``score_rollout`` (called by the rollout DataModule before callbacks see the batch) fills what is read of
  ``old_logprobs``, ``embeddings``, the token summaries (``token_entropy``, ``token_mean_logprob``) and
  ``ref_logprobs`` under the same precision context as ``training_step``
  (so that on the first iteration the ratio is exactly 1 under bf16-mixed too).
- ``training_step`` uses manual optimization: ``num_iterations`` optimizer steps per rollout batch, each over
  micro-batches with the loss normalised by the whole batch's (all ranks') counts, so the gradient does not
  depend on the micro-batch size or the number of devices. Gradients are reduced over ranks on the last
  micro-batch of each optimizer step only. A step whose loss (on any rank) or global gradient is not finite
  is skipped on every rank and counted in ``train/skipped_steps``.
Precision and the strategy come from the Trainer (32-true, bf16-mixed, bf16-true; single device, DDP, or
``fsdp2``); others are refused in ``setup`` (and by ``lit-gcpo`` at parse time). Gradient clipping is
``max_grad_norm`` here because Lightning leaves clipping to the module under manual optimization.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lit_gcpo.algorithms.surrogate_options import Surrogate
from lit_gcpo.algorithms.token_selection import TokenSelection
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.training.loss_step import LossStep, StepPlan
from lit_gcpo.training.optimizer_step import GuardedOptimizerStep, default_scheduler
from lit_gcpo.training.options import check_options, resolve_rollout_correction
from lit_gcpo.training.parallel import gradient_sync, is_sharded, shard_causal_lm, unsupported_option
from lit_gcpo.training.policy import LoraOptions, load_policy, load_tokenizer, merged_state_items, save_policy
from lit_gcpo.training.reference import ReferencePolicy
from lit_gcpo.training.rollout_scoring import ScoringPasses, fill_rollout_scores
from lit_gcpo.training.scoring import CompletionScorer, ScoredTokens
from lit_gcpo.training.step_metrics import log_training_step, logs_this_step, merge_step_metrics
from lit_gcpo.training.token_selection import LossTokenSelection, rank_gather
from lit_gcpo.training.validation import ValidationRecord

log = logging.getLogger(__name__)


def default_optimizer(params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with lr 1e-6 and no weight decay, the papers' setting."""
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


class GRPOModule(L.LightningModule):
    """GRPO, Dr. GRPO, SEED-GRPO and GCPO training of a causal LM (the uncertainty weights come from
    ``lit_gcpo.callbacks.UncertaintyCallback`` through ``batch.advantage_weights``).

    Args:
        model: a Hugging Face model name or path, or ``lit-gcpo/tiny-arith`` (the embedded tiny model).
        tokenizer: tokenizer name or path (default: the model's).
        dtype: dtype of the policy weights (``float32``, ``bfloat16``); keep float32 with ``bf16-mixed``.
        attn_implementation: transformers' attention (``sdpa``, ``flash_attention_2``, ...; None: its default).
        lora: train LoRA adapters instead of the full model (needs ``peft``).
        gradient_checkpointing: recompute activations in backward to save memory.
        disable_dropout: set every dropout to 0 (the usual choice for RL of LMs).
        optimizer: the optimizer (default AdamW, lr 1e-6).
        scheduler: an LR scheduler stepped once per optimizer step (default: ``warmup_steps`` of linear warm-up,
            then ``lr_decay``).
        warmup_steps: optimizer steps of linear warm-up for the default scheduler.
        lr_decay: what the default scheduler does after the warm-up: ``constant``, or a ``linear`` or ``cosine``
            decay that reaches ``min_lr_ratio`` x the optimizer's lr at ``trainer.max_steps`` (optimizer steps; a
            run resumed with another ``max_steps`` follows the new schedule from the step it reached: the lr jumps).
        min_lr_ratio: the decay's final lr, as a fraction of the optimizer's lr.
        advantage: ``grpo`` (std-normalised) or ``dr_grpo`` (mean-centred only).
        advantage_scale: ``group`` or ``batch`` std for ``grpo``.
        loss_aggregation: ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum_norm`` or (LUSPO, with the
            sequence ratio) ``seq_mean_token_sum``.
        eps_low: lower clip range of the ratio.
        eps_high: upper clip range (> eps_low is DAPO's clip-higher).
        dual_clip: dual-clip constant c for negative advantages (None: off).
        ratio_level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO; with ``loss_aggregation: seq_mean_token_sum``, LUSPO).
        surrogate: the policy loss when not the clipped surrogate of eps_low / eps_high / dual_clip (None): ``CISPO``,
            ``SAPO`` or ``VESPO`` (``lit_gcpo.algorithms.surrogate_options``; ``--model.surrogate.help SAPO``).
        rollout_correction: how the loss corrects for an engine that samples from its own copy of the policy (vLLM),
            by the ratio of the trainer's to the engine's probabilities of the sampled tokens (TRL 1.16's
            ``vllm_importance_sampling_mode``, the same loss): ``token_truncate`` (each token's ratio clamped to
            [C_min, C_max]), ``token_mask`` (a token whose ratio is outside gets weight 0), ``sequence_truncate`` /
            ``sequence_mask`` (one ratio per sequence, exp of the summed log-ratios); None: off. Only used when the
            engine is not the policy itself (``hf`` needs no correction).
        rollout_correction_min: C_min (None: no lower bound).
        rollout_correction_max: C_max (None: no upper bound; TRL's default is 3.0 with ``sequence_mask``).
        off_policy_mask_threshold: delta of DeepSeek-V3.2's off-policy sequence masking (TRL's option of that name):
            a completion with a negative advantage is left out of the policy loss when the mean over its tokens of
            log pi_sampler - log pi_current exceeds delta (the sampler: the engine's log-probs when it is another
            engine, else the old log-probs). None: off.
        tis_cap: deprecated, the old name of ``rollout_correction_max`` of ``token_truncate`` (0: correction off).
        beta: KL coefficient; 0 loads no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        entropy_coef: coefficient of the entropy bonus.
        token_selection: which tokens carry the policy gradient (None: all; ``lit_gcpo.training.token_selection``):
            ``HighEntropyTokens`` (the top rho by entropy), ``ClipCov`` or ``KLCov`` (covariance control);
            ``--model.token_selection.help ClipCov`` lists a method's options.
        num_iterations: optimizer steps per rollout batch (old log-probs stay those of the generating policy).
        micro_batch_size: completions per forward/backward pass (0: the whole batch).
        max_grad_norm: gradient-norm clipping (0: off).
        logprob_chunk_size: tokens per chunk of the memory-bounded log-prob computation.
        padding_free: every log-prob pass over each micro-batch's sequences packed into one row without padding,
            attention kept within each (``lit_gcpo.training.scoring``): the same loss, less work.
        mask_truncated_completions: leave completions that hit ``max_new_tokens`` out of the loss (DAPO's overlong
            filtering): a truncated completion's reward says nothing about an answer it never finished.
        log_samples_every_n_steps: write a few prompts, completions and rewards as TensorBoard text.
        max_consecutive_skips: stop with an error after this many optimizer steps in a row were skipped for a
            non-finite loss or gradient (the weights are still those of the last good step).
        export_dir: where ``save_pretrained`` writes the policy at the end of fit (``auto``: the log dir).
    """

    def __init__(
        self,
        model: str = "lit-gcpo/tiny-arith",
        tokenizer: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        lora: LoraOptions | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        warmup_steps: NonNegativeInt = 0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        min_lr_ratio: NonNegativeFloat = 0.0,
        advantage: Literal["grpo", "dr_grpo"] = "grpo",
        advantage_scale: Literal["group", "batch"] = "group",
        loss_aggregation: Literal[
            "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"
        ] = "token_mean",
        eps_low: NonNegativeFloat = 0.2,
        eps_high: NonNegativeFloat = 0.2,
        dual_clip: PositiveFloat | None = None,
        ratio_level: Literal["token", "sequence"] = "token",
        surrogate: Surrogate | None = None,
        rollout_correction: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
        | None = "token_truncate",
        rollout_correction_min: NonNegativeFloat | None = None,
        rollout_correction_max: PositiveFloat | None = 2.0,
        off_policy_mask_threshold: PositiveFloat | None = None,
        tis_cap: NonNegativeFloat | None = None,
        beta: NonNegativeFloat = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        entropy_coef: float = 0.0,
        token_selection: TokenSelection | None = None,
        num_iterations: PositiveInt = 1,
        micro_batch_size: NonNegativeInt = 0,
        max_grad_norm: NonNegativeFloat = 1.0,
        logprob_chunk_size: PositiveInt = 4096,
        padding_free: bool = False,
        mask_truncated_completions: bool = False,
        log_samples_every_n_steps: NonNegativeInt = 50,
        max_consecutive_skips: PositiveInt = 20,
        export_dir: str | None = "auto",
    ) -> None:
        super().__init__()
        check_options(locals())
        rollout_correction, rollout_correction_max = resolve_rollout_correction(
            tis_cap, rollout_correction, rollout_correction_min, rollout_correction_max
        )
        tis_cap = None  # saved as resolved
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        self.loss_step = LossStep.from_hparams(self.hparams, LossTokenSelection(token_selection), surrogate)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.policy = load_policy(model, dtype, lora, disable_dropout, attn_implementation)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.uses_lora = lora is not None
        self.scorer = CompletionScorer(self.policy, logprob_chunk_size, padding_free=padding_free)
        # With LoRA the reference is the base model with the adapters disabled; otherwise a frozen copy that is
        # not a submodule (never checkpointed), placed by `setup` like the policy (see lit_gcpo.training.reference).
        self.reference: ReferencePolicy | None = None
        if beta > 0 and not self.uses_lora:
            self.reference = ReferencePolicy(model, dtype, attn_implementation, like=self.scorer)
        self.guarded_step = GuardedOptimizerStep(max_grad_norm, max_consecutive_skips)
        self.validation = ValidationRecord()  # the starting policy's baseline, the history of val/accuracy

    @property
    def skipped_steps(self) -> int:
        return self.guarded_step.skipped

    @property
    def validation_history(self) -> list[tuple[int, float]]:
        """``(step, val/accuracy)`` of every validation, the starting policy's included; kept across resume."""
        return self.validation.history

    # ---------------------------------------------------------------------------------- placement
    def configure_model(self) -> None:
        """Under ``fsdp2``, shard the policy (each decoder layer a unit, the model the root). Without a Trainer
        (``load_from_checkpoint``) there is nothing to shard."""
        if self._trainer is not None and is_sharded(self.trainer.strategy):
            if self.uses_lora:
                raise ValueError("lora with trainer.strategy fsdp2 is not supported; use ddp for LoRA training")
            shard_causal_lm(self.policy, self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        reason = unsupported_option(trainer.strategy, trainer.precision)
        if reason is not None:
            raise ValueError(reason)
        if self.reference is not None:
            mesh = self.device_mesh["data_parallel"] if is_sharded(trainer.strategy) else None
            self.reference.place(trainer.strategy.root_device, trainer.precision, mesh)

    # -------------------------------------------------------------------------------- forward passes
    def completion_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_length: int,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        reference: bool = False,
        with_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Sampled-token log-probs of the last ``completion_length`` columns under ``log_softmax(logits /
        temperature)``, without full logits.

        Returns ``(logprobs [n, L], entropy [n, L] or None, completion hidden states [n, L, H] or None)``; with
        ``reference`` they are the reference model's (the LoRA base model with its adapters disabled).
        """
        options = {"temperature": temperature, "with_entropy": with_entropy, "with_hidden": with_hidden}
        scored = self.completion_scores(input_ids, attention_mask, completion_length, reference=reference, **options)
        return scored.logprobs, scored.entropy, scored.hidden

    def completion_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_length: int,
        *,
        reference: bool = False,
        **options: Any,
    ) -> ScoredTokens:
        """``completion_logprobs``'s pass with everything the scorer gives (``with_distribution``: the token
        summaries), as ``lit_gcpo.training.scoring.ScoredTokens``."""
        scorer = self.reference.scorer if reference and self.reference is not None else self.scorer
        adapters_off = self.policy.disable_adapter() if reference and self.uses_lora else contextlib.nullcontext()
        with adapters_off:
            return scorer(input_ids, attention_mask, completion_length, **options)

    @torch.no_grad()
    def score_rollout(
        self, batch: RolloutBatch, with_reference: bool = True, fields: Collection[str] | None = None
    ) -> None:
        """Fill ``old_logprobs``, ``embeddings``, the token summaries (``token_entropy``, ``token_mean_logprob``) and
        (beta > 0) ``ref_logprobs`` of a fresh rollout, in the micro-batches and under the precision context of
        ``training_step`` (bitwise the same forward).

        ``with_reference``: a training batch (the reference and the loss's own needs count). ``fields``: the
        optional fields the callbacks read (``lit_gcpo.data.batch.requested_fields``); None: all of them. What nobody
        reads is not computed, and with nothing to compute there is no forward pass at all.
        """
        start = time.perf_counter()
        passes = ScoringPasses.needed(
            batch,
            fields,
            loss_needs_old=with_reference and self.loss_step.needs_old_logprobs(batch),
            with_reference_model=with_reference and self.hparams.beta > 0,
            loss_fields=self.loss_step.selection.fields if with_reference else (),
        )
        with self.precision_context():
            fill_rollout_scores(batch, passes, self._micro_batches(batch.num_completions), self.completion_scores)
        batch.metrics["time/score_s"] = time.perf_counter() - start

    def precision_context(self) -> Any:
        """The trainer's precision (autocast under bf16-mixed): training, scoring and hf sampling run in it."""
        if self._trainer is None:
            return torch.autocast("cpu", enabled=False)
        return self._trainer.precision_plugin.forward_context()

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.hparams.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def reduce_over_ranks(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over data-parallel ranks by ``sum``, ``min`` or ``max`` (itself on one device)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op=op)

    # ------------------------------------------------------------------------------------- training
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        gather = rank_gather(self._trainer)  # the high-entropy quantile is over every rank's tokens
        plan, plan_metrics = self.loss_step.plan(
            batch, self.reduce_over_ranks, logs_this_step(self._trainer), gather, self.global_step
        )
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        micro = self._micro_batches(batch.num_completions)
        parts: list[tuple[dict[str, Any], torch.Tensor]] = []
        for _ in range(self.hparams.num_iterations):
            step_loss = torch.zeros((), device=plan.mask.device)  # this rank's share of the global loss
            for index, rows in enumerate(micro):
                with gradient_sync(self.trainer.strategy, self.policy, enabled=index == len(micro) - 1):
                    loss, metrics = self._micro_batch_loss(batch, rows, plan)
                    # DDP and FSDP average gradients over ranks, hence the world-size factor on each rank's share
                    self.manual_backward(loss * self.trainer.world_size)
                step_loss = step_loss + loss.detach()
                parts.append((metrics, plan.mask[rows].sum()))
            self.guarded_step(optimizer, scheduler, step_loss, all_reduce=self.reduce_over_ranks, step=self.global_step)
        step_metrics = merge_step_metrics(parts, self.hparams.num_iterations, self.reduce_over_ranks)  # global values
        step_metrics |= {**self.guarded_step.metrics(), "lr": optimizer.param_groups[0]["lr"]}
        log_training_step(self, batch, batch_idx, step_metrics, plan_metrics, time.perf_counter() - start)

    def _micro_batch_loss(
        self, batch: RolloutBatch, rows: slice, plan: StepPlan
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """This micro-batch's share of the batch's loss and its metrics: the policy's forward over ``rows``, then
        the loss step's loss (``lit_gcpo.training.loss_step``)."""
        logprobs, entropy, _ = self.completion_logprobs(
            batch.input_ids[rows],
            batch.attention_mask[rows],
            plan.mask.shape[1],
            temperature=batch.logprob_temperature,
            with_entropy=plan.with_entropy,
        )  # [n, L]
        return self.loss_step.micro_batch_loss(batch, rows, logprobs, entropy, plan)

    # ----------------------------------------------------------------------------------- evaluation
    def on_validation_epoch_end(self) -> None:
        """The validation joins ``validation_history``; the sanity check's (``num_sanity_val_steps: -1``: a full
        validation of the starting policy, which Lightning does not log) is written as the step-0 baseline."""
        self.validation.end_validation(self.trainer, self.global_step)

    def validation_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation.log_batch(self.log, batch, "val", self.trainer.sanity_checking)

    def test_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # dataloader_idx: Lightning requires it once there are several test sources (one per benchmark)
        self.validation.log_batch(self.log, batch, "test", self.trainer.sanity_checking)

    def predict_step(self, batch: RolloutBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The DataModule generated and scored the batch; lit_gcpo.running.prediction.PredictionWriter writes it.
        return None

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(p for p in self.policy.parameters() if p.requires_grad)
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            hp = self.hparams
            max_steps = self.trainer.max_steps if self._trainer is not None else -1
            scheduler = default_scheduler(
                optimizer, warmup=hp.warmup_steps, decay=hp.lr_decay, floor=hp.min_lr_ratio, max_steps=max_steps
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ weights export
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full weights with Hugging Face names (LoRA merged, FSDP shards gathered), for the rollout
        engine's sync. Under FSDP2 gathering is a collective: every rank must iterate it."""
        return merged_state_items(self.policy, self.uses_lora)

    def on_fit_end(self) -> None:
        target = self.hparams.export_dir
        if target is None:
            return
        if target == "auto":
            target = str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "policy")
        # every rank takes part in gathering sharded weights; rank 0 writes
        save_policy(self.policy, self.tokenizer, target, self.uses_lora, write=self.trainer.is_global_zero)
        self.exported_to = target
        rank_zero_info("; ".join(filter(None, (f"policy exported to {target}", self.validation.summary()))))

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_gcpo"] = {**self.guarded_step.state_dict(), **self.validation.checkpoint_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_gcpo", {})
        self.guarded_step.load_state_dict(state)
        self.validation.load_checkpoint_state(state)
