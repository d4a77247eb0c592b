"""The trainer-engine mismatch a rollout-correction mode meets, recorded during a fit and summarised (issue 22 item 2).

``MismatchRecorder`` (a Lightning callback, added to a ``lit-gcpo fit`` with ``--trainer.callbacks+=
rollout_mismatch.MismatchRecorder`` and ``benchmarks/`` on ``PYTHONPATH``) keeps, for every training batch whose
engine is another copy of the policy (``data.off_policy``, the ``vllm`` engine), what the loss's correction reads:
the trainer's log-probs of the sampled tokens under the current weights (``old_logprobs``), the engine's at sampling
time, the loss mask and the advantages. The functions below summarise such records, with the library's own
``rollout_correction_weights`` and ``off_policy_sequence_mask`` for the shares each mode would mask or truncate, so
that every mode is measured on the very batches one run trained on:

- token log-ratio ``d_t = old_t - engine_t`` on mask tokens; sequence log-ratio ``D_i = sum_t d_t`` (TRL's
  ``sequence_*`` ratio is ``exp(D_i)``); the off-policy KL of DeepSeek-V3.2's mask, ``KL_i = -D_i / n_i``
  (``behaviour - current`` averaged over the n_i tokens; the current log-probs are ``old`` at the first of the
  ``num_iterations`` optimizer steps, the only one with ``num_iterations: 1``);
- ratio quantiles are ``exp`` of the log-ratio quantiles (``torch.quantile``, linear interpolation; exp is
  monotone, and the log side cannot overflow);
- a mode's shares are the means over recorded steps of the per-step shares the fit logs
  (``correction_{masked,truncated}_{token,seq}_frac``), and their largest step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_gcpo.algorithms.rollout_correction import off_policy_sequence_mask, rollout_correction_weights

QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)
Record = dict[str, Any]  # one training batch: step, lag, old / engine [N, L], mask [N, L] bool, advantages [N]


class MismatchRecorder(L.Callback):
    """Records every corrected training batch (module docstring); writes the list to ``path`` with ``torch.save``
    at the end of the fit. A fit whose batches have no engine log-probs to correct against records nothing and
    fails at the end, naming why (a benchmark of the correction on uncorrected batches measures nothing)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.records: list[Record] = []

    def rollout_fields(self, stage: str) -> set[str]:
        """It reads the trainer's old log-probs, which with one iteration per rollout a scoring pass computes only when
        something asks for them (``lit_gcpo.data.batch.requested_fields``)."""
        return {"old_logprobs"} if stage == "train" else set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        loss_step = pl_module.loss_step
        engine = loss_step.engine_logprobs(batch)  # None when the engine samples from the policy itself
        if engine is None or batch.old_logprobs is None:
            return
        advantages, mask, _ = loss_step.advantages_and_mask(batch, lambda tensor, op: tensor)  # [N], [N, L]
        self.records.append(
            {
                "step": trainer.global_step,
                "lag": float(batch.metrics.get("rollout/weight_lag", 0.0)),
                "old": batch.old_logprobs.detach().float().cpu(),  # [N, L]
                "engine": engine.detach().float().cpu(),  # [N, L]
                "mask": (mask > 0).cpu(),  # [N, L]
                "advantages": advantages.detach().float().cpu(),  # [N]
            }
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.records:
            raise RuntimeError(
                "MismatchRecorder: no training batch had engine log-probs to correct against (the hf engine samples "
                "from the policy itself): use data.off_policy or the vllm engine with model.rollout_correction set"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.records, self.path)


def load_records(path: Path) -> list[Record]:
    """The records ``MismatchRecorder`` saved at ``path``."""
    return torch.load(path, weights_only=True)


def log_ratios(records: Sequence[Record]) -> tuple[Tensor, Tensor, Tensor]:
    """``(d [M], D [S], KL [S])`` over all ``records``: the token log-ratios on mask tokens, and per sequence with
    a mask token its summed log-ratio and the off-policy KL ``-D_i / n_i`` (a NaN log-prob counts 0, as in the
    loss)."""
    tokens, sums, kls = [], [], []
    for record in records:
        mask = record["mask"]  # [N, L]
        d = torch.where(mask, (record["old"] - record["engine"]).nan_to_num(nan=0.0), 0.0)  # [N, L]
        n = mask.sum(-1)  # [N]
        tokens.append(d[mask])
        sums.append(d.sum(-1)[n > 0])
        kls.append((-d.sum(-1) / n.clamp_min(1))[n > 0])
    return torch.cat(tokens), torch.cat(sums), torch.cat(kls)


def quantile_summary(values: Tensor, quantiles: Sequence[float] = QUANTILES, exp: bool = False) -> dict[str, float]:
    """``{"min", "p1", ..., "max"}`` of ``values`` (``exp``: of ``exp(values)``, computed on the log side)."""
    if values.numel() == 0:
        raise ValueError("quantile_summary: no values (no recorded mask tokens)")
    values = values.double()
    points = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64))
    summary = {"min": values.min(), **{f"p{100 * q:g}": p for q, p in zip(quantiles, points, strict=True)}}
    summary["max"] = values.max()
    return {key: float(value.exp() if exp else value) for key, value in summary.items()}


def mode_shares(records: Sequence[Record], mode: str, c_min: float | None, c_max: float | None) -> dict[str, float]:
    """The shares of tokens and sequences ``mode`` masks or truncates at ``[c_min, c_max]``, per step as the fit
    logs them (``rollout_correction_weights``): ``token`` / ``seq`` the means over the records, ``token_max`` /
    ``seq_max`` the largest step's."""
    token, seq = [], []
    for record in records:
        _, metrics = rollout_correction_weights(
            record["old"], record["engine"], record["mask"].float(), mode, c_min, c_max
        )
        kind = "masked" if mode.endswith("_mask") else "truncated"
        token.append(float(metrics[f"correction_{kind}_token_frac"]))
        seq.append(float(metrics[f"correction_{kind}_seq_frac"]))
    return _means_and_maxima(token, seq)


def off_policy_mask_shares(records: Sequence[Record], threshold: float) -> dict[str, float]:
    """The shares of sequences and tokens DeepSeek-V3.2's off-policy mask drops at ``threshold`` (delta), per step
    as the fit logs them (``off_policy_sequence_mask`` with the current log-probs = ``old``): means and maxima."""
    token, seq = [], []
    for record in records:
        _, metrics = off_policy_sequence_mask(
            record["old"], record["engine"], record["advantages"], record["mask"].float(), threshold
        )
        token.append(float(metrics["off_policy_masked_token_frac"]))
        seq.append(float(metrics["off_policy_masked_seq_frac"]))
    return _means_and_maxima(token, seq)


def _means_and_maxima(token: list[float], seq: list[float]) -> dict[str, float]:
    if not token:
        raise ValueError("no records to summarise")
    return {"token": sum(token) / len(token), "seq": sum(seq) / len(seq), "token_max": max(token), "seq_max": max(seq)}
