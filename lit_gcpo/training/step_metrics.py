"""What a training step logs: its loss metrics merged over micro-batches, iterations and data-parallel ranks,
the rollout's own metrics, and a few samples as text.

Each micro-batch's loss is already normalised by the whole step's counts (all ranks' tokens or sequences),
so the global loss of an iteration is the sum of every rank's micro-batch losses, and the step's value is
the mean over its ``num_iterations``. Ratios, clip fractions and the like are means over completion tokens:
weighted by each micro-batch's tokens and reduced over ranks as sums, so that a rank with more tokens counts
more. ``*_min`` / ``*_max`` reduce by min / max. Three collectives per step, whatever the number of metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_gcpo.data.batch import COUNT_SUFFIXES

# parts of one batch-level loss, and shares of the batch's counts
# (lit_gcpo.algorithms.rollout_correction.off_policy_sequence_mask)
SUMMED = (
    "loss",
    "policy_loss",
    "kl_loss",
    "entropy_loss",
    "off_policy_masked_seq_frac",
    "off_policy_masked_token_frac",
)

# reduce(tensor, op) with op in {"sum", "min", "max"}: over data-parallel ranks (identity on one device)
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


def merge_step_metrics(
    parts: list[tuple[dict[str, Any], torch.Tensor]], num_iterations: int, reduce: Reduce
) -> dict[str, torch.Tensor]:
    """One global value per metric from ``(metrics, completion tokens)`` of every micro-batch of the step."""
    keys = list(parts[0][0])
    values = torch.stack(
        [torch.stack([torch.as_tensor(m[k], dtype=torch.float32).detach().reshape(()) for k in keys]) for m, _ in parts]
    )  # [micro-batches x iterations, K]
    tokens = torch.stack([t.float().reshape(()) for _, t in parts]).to(values.device)  # [M]
    summed = [k in SUMMED for k in keys]
    lows = [k.endswith("_min") for k in keys]
    highs = [k.endswith("_max") for k in keys]
    # [K sums: the loss terms summed, the other means as token-weighted sums] + [token total]
    weighted = torch.where(torch.tensor(summed, device=values.device), values, values * tokens.unsqueeze(-1)).sum(
        0
    )  # [K]
    totals = reduce(torch.cat([weighted, tokens.sum().unsqueeze(0)]), "sum")  # [K + 1]
    minima = reduce(values.min(0).values, "min")  # [K]
    maxima = reduce(values.max(0).values, "max")  # [K]
    token_total = totals[-1].clamp(min=1)
    merged: dict[str, torch.Tensor] = {}
    for index, key in enumerate(keys):
        if summed[index]:
            merged[key] = totals[index] / num_iterations
        elif lows[index]:
            merged[key] = minima[index]
        elif highs[index]:
            merged[key] = maxima[index]
        else:
            merged[key] = totals[index] / token_total
    return merged


def rollout_metrics(batch: Any, accuracy: torch.Tensor | None) -> dict[str, Any]:
    """This rank's rollout metrics (averaged over ranks when logged, counts summed): rewards over their finite
    values, each reward's mean, accuracy, the mean advantage weight, and what was measured while building the
    batch."""
    values: dict[str, Any] = {}
    finite = batch.rewards[torch.isfinite(batch.rewards)]
    values["reward/mean"] = finite.mean() if finite.numel() else torch.tensor(float("nan"))
    values["reward/std"] = finite.std() if finite.numel() > 1 else torch.zeros(())
    for name, scores in batch.reward_components.items():
        ok = scores[torch.isfinite(scores)]
        values[f"reward/{name}_mean"] = ok.mean() if ok.numel() else torch.tensor(float("nan"))
    if accuracy is not None:
        values["train/accuracy"] = accuracy.mean()
    if batch.advantage_weights is not None:
        values["train/advantage_weight_mean"] = batch.advantage_weights.mean()
    values.update(batch.metrics)
    return values


def logs_this_step(trainer: Any) -> bool:
    """Whether the current training step writes logs: Lightning's ``log_every_n_steps`` cadence over the batches
    trained so far (the count its logger connector uses; one optimizer "step" of the cadence per batch, as
    under manual optimization every batch steps), or the last step of a run that is stopping."""
    if trainer is None or trainer.log_every_n_steps == 0:
        return False
    batch = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # 1-based, across epochs and resumes
    return batch % trainer.log_every_n_steps == 0 or trainer.should_stop


def log_step_scalars(trainer: Any, values: dict[str, Any]) -> None:
    """Write one training step's scalars as ``LightningModule.log(on_step=True)`` would, through public Lightning
    APIs: to every logger (``Logger.log_metrics``, rank 0) at Lightning's cadence and step numbering (the batches
    trained so far, with ``epoch`` added), and into the dicts ``trainer.logged_metrics`` and
    ``trainer.callback_metrics`` return (checkpoint monitors, early stopping).

    Why not ``LightningModule.log_dict``: its result collection costs about 0.8 ms a key on a CPU (measured with
    ``benchmarks/bench_step.py``: the ~70 scalars the module and the uncertainty callback write made a quickstart
    step 25 % slower), and a training step's scalars need none of its epoch aggregation. The values must be the
    same on every rank already (reduced by the caller).
    """
    scalars = {key: float(value) for key, value in values.items()}
    tensors = {key: torch.tensor(value) for key, value in scalars.items()}
    trainer.callback_metrics.update(tensors)
    trainer.logged_metrics.update(tensors)  # with or without loggers, as Lightning's own step logging
    if logs_this_step(trainer):
        step = trainer.fit_loop.epoch_loop.total_batch_idx  # the step number Lightning's loggers get
        for logger in trainer.loggers:
            logger.log_metrics({"epoch": trainer.current_epoch, **scalars}, step=step)
            logger.save()


def mean_over_ranks(
    values: dict[str, Any], reduce: Reduce, world_size: int, device: torch.device, summed: Collection[str] = ()
) -> dict[str, Any]:
    """Each value averaged over the data-parallel ranks, those named in ``summed`` added up (counts), in one
    collective (identity on one device)."""
    if world_size == 1 or not values:
        return values
    stacked = torch.tensor([float(value) for value in values.values()], dtype=torch.float64, device=device)  # [K]
    divisors = torch.tensor([1.0 if key in summed else world_size for key in values], dtype=torch.float64)  # [K]
    reduced = (reduce(stacked, "sum") / divisors.to(device)).tolist()
    return dict(zip(values, reduced, strict=True))


def sample_text(batch: Any, count: int = 4) -> str:
    """The first completion of the first ``count`` prompts with its reward, as TensorBoard markdown."""
    group_size = batch.num_completions // batch.num_groups
    lines = []
    for n in range(0, min(count * group_size, batch.num_completions), group_size):
        lines.append(
            f"**prompt** `{batch.prompts[n // group_size]!r}`  \n**completion** `{batch.completions[n]!r}`  \n"
            f"**reward** {float(batch.rewards[n]):.3f}"
        )
    return "\n\n---\n\n".join(lines)


def log_training_step(
    module: Any, batch: Any, batch_idx: int, reduced: dict[str, Any], rank_metrics: dict[str, Any], train_s: float
) -> None:
    """Log one training step of ``module`` (a ``GRPOModule``): ``reduced`` as they are (global already: the loss
    metrics merged over micro-batches and ranks, the optimizer's state) and ``rank_metrics`` (the step plan's), the
    rollout's metrics and ``train_s`` averaged over ranks (the counts, ``lit_gcpo.data.batch.COUNT_SUFFIXES``,
    summed), all as ``log_step_scalars`` writes them; the reward and the accuracy to the progress bar; every
    ``log_samples_every_n_steps`` batches a few samples as TensorBoard text.
    """
    trainer = module.trainer
    values = {f"train/{k}": v for k, v in rank_metrics.items()} | rollout_metrics(batch, batch.correct)
    values["time/train_s"] = train_s
    counts = [key for key in values if key.endswith(COUNT_SUFFIXES)]  # of this rank's completions: summed
    averaged = mean_over_ranks(values, module.reduce_over_ranks, trainer.world_size, module.device, counts)
    log_step_scalars(trainer, averaged | {f"train/{k}": v for k, v in reduced.items()})
    module.log("reward", values["reward/mean"], prog_bar=True, logger=False, batch_size=batch.num_groups)
    if batch.correct is not None:
        module.log("acc", values["train/accuracy"], prog_bar=True, logger=False, batch_size=batch.num_groups)
    every = module.hparams.log_samples_every_n_steps
    writes_text = isinstance(module.logger, TensorBoardLogger) and trainer.is_global_zero
    if every and batch_idx % every == 0 and writes_text:
        module.logger.experiment.add_text("samples", sample_text(batch), global_step=module.global_step)
