"""One policy's faithfulness diagnosis (METHODS.md section 6): sample, reward and score G completions of every
prompt of a ``Setting`` (``faithfulness_testbeds``), compute V and the signals as training does, correlate them.

The machinery behind ``benchmarks/uncertainty_faithfulness.py`` (its docstring says what is measured; that script
prints and writes the tables). ``diagnose`` returns a ``Diagnosis``: the correlations and paired differences of
``lit_gcpo.algorithms.faithfulness`` and, on a noisy testbed, every weighting's weights on the noisy versus the
clean prompts (``weights_by_noise``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import METHODS
from faithfulness_testbeds import Setting

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.clustering import answer_clusters, embedding_clusters
from lit_gcpo.algorithms.embeddings import BATCH_SOURCE, SentenceEncoder
from lit_gcpo.algorithms.faithfulness import (
    LENGTH,
    Difference,
    Faithfulness,
    WeightRatio,
    completion_gradients,
    correct_counts,
    correlation_differences,
    faithfulness,
    gradient_variance,
    weight_ratio_by_k,
)
from lit_gcpo.algorithms.label_free import label_free_signals
from lit_gcpo.algorithms.uncertainty import advantage_weights, calibrated_uncertainty, uncertainty_signals
from lit_gcpo.data.batch import PromptBatch, RolloutBatch
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.data.templates import PromptRenderer
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.rewards import RewardSet
from lit_gcpo.training.module import GRPOModule

SIGNAL_LABELS = {
    "se": "SE (Rao, answer clusters)",
    "cd": "CD (centred policy embeddings)",
    "bot": "BoT (centred policy embeddings)",
    "rd": "RD",
    "u_c": "U_c = BoT (1 - RD)",
    "u_c_cd": "U_c with CD = CD (1 - RD)",
    "majority": "majority agreement (TTRL: share of the majority answer)",
    "cluster_share": "cluster share (EMPO: mean share of a completion's cluster)",
    "self_certainty": "mean self-certainty (Intuitor: KL(U || p_t))",
    "token_entropy": "mean token entropy (RENT: minus its reward)",
    LENGTH: "mean completion length (control)",
}
DIFFERENCES = (
    ("bot", "se"), ("cd", "se"), ("u_c", "se"), ("u_c", "rd"), ("bot", LENGTH), ("se", LENGTH),
    ("token_entropy", "se"), ("token_entropy", LENGTH),
)  # fmt: skip


def collect(module: GRPOModule, rows: list[dict], setting: Setting, group_size: int, sampling: SamplingConfig,
            chunk: int) -> list[RolloutBatch]:  # fmt: skip
    """Sample, reward and score G completions for every row (rendered with the setting's template), ``chunk``
    prompts per generate call."""
    rewards = RewardSet.from_names(setting.rewards, setting.reward_weights)
    renderer = PromptRenderer(module.tokenizer, setting.template, setting.system, setting.chat)
    engine = HFEngine(module.policy, module.tokenizer)
    collector = RolloutCollector(engine, module.tokenizer, rewards, add_special_tokens=not renderer.use_chat)
    batches: list[RolloutBatch] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        prompt_batch = PromptBatch([renderer.render(r) for r in part], part, list(range(start, start + len(part))))
        seeded = SamplingConfig(**{**vars(sampling), "seed": sampling.seed + start})
        batch = collector.collect(prompt_batch, group_size, seeded, module.device)
        module.score_rollout(batch, with_reference=False)  # old_logprobs, embeddings, token summaries
        batches.append(batch)
    return batches


def batch_signals(
    batch: RolloutBatch, setting: Setting, encoder: SentenceEncoder | None = None
) -> dict[str, torch.Tensor]:
    """``[B]`` SE, CD, BoT, RD, U_c (BoT and CD) of every group, as the callback computes them in training with the
    setting's clustering and embeddings (``encoder``: the sentence model that embeds the completions, else the
    policy's embeddings from the scoring pass), and the label-free methods' signals (majority agreement, cluster
    share, mean self-certainty and token entropy: the group means of their rewards, from the scoring pass's token
    summaries). A completion counts as answered when it has an answer (answer clusters) or any text (embedding
    clusters of free text)."""
    embeddings = batch.embeddings if encoder is None else encoder.encode(batch.completions)  # [N, d]
    if setting.clustering == "embedding":
        clusters = embedding_clusters(embeddings, batch.group_ids, setting.tau)  # [N]
        answered = [text.strip() != "" for text in batch.completions]
    else:
        clusters = answer_clusters(batch.answers, batch.group_ids)  # [N]
        answered = [answer not in (None, "") for answer in batch.answers]
    signals, _ = uncertainty_signals(
        batch.group_ids, batch.num_groups, rewards=batch.rewards, cluster_ids=clusters,
        embeddings=embeddings, seq_logprobs=batch.seq_logprobs, se_kind="rao", geometric="bot", center="batch",
    )  # fmt: skip
    signals["u_c_cd"] = calibrated_uncertainty(signals["cd"], signals["rd"])
    signals |= label_free_signals(
        clusters, batch.group_ids, batch.num_groups, torch.tensor(answered, device=clusters.device),
        token_entropy=batch.token_entropy, token_mean_logprob=batch.token_mean_logprob, mask=batch.completion_mask,
        vocab_size=batch.vocab_size,
    )  # fmt: skip
    return {name: signals[name].detach().double().cpu() for name in [*SIGNAL_LABELS, "se_n"] if name != LENGTH}


WEIGHTINGS = {name: METHODS[name] for name in ("seed_grpo", "seed_grpo_sf", "gcpo_bot", "gcpo_cd", "rd_only")}
"""The weightings compared on noisy and clean prompts: compare_methods.py's (grpo's weights are all 1)."""


def weights_by_noise(
    per_batch: list[tuple[dict[str, torch.Tensor], list[dict], np.ndarray | None]],
) -> tuple[list[str], dict[str, WeightRatio]]:
    """The table of each weighting's weights on the noisy and on the clean prompts with RD > 0 (noisy testbed), and
    the ratios by weighting: does a weighting damp the prompts whose rewards are coin flips beyond what their number
    of correct completions k does? Each chunk of prompts is one step's weighting; the ratio within equal-k strata is
    ``weight_ratio_by_k``'s (the clean prompts' mean weight standardised to the noisy prompts' mix of k)."""
    if any(counts is None for *_, counts in per_batch):
        raise ValueError("the noisy testbed's rewards should be 0/1 (k is undefined otherwise)")
    noisy = np.concatenate([[float(row.get("noise_rate") or 0.0) > 0 for row in rows] for _, rows, _ in per_batch])
    spread = np.concatenate([signals["rd"].numpy() > 0 for signals, _, _ in per_batch])
    k = np.concatenate([counts for *_, counts in per_batch])[spread]
    noisy = noisy[spread]
    lines = [
        f"| weighting | mean weight, noisy prompts with RD > 0 (n = {int(noisy.sum())}) | mean weight, clean prompts "
        f"with RD > 0 (n = {int((~noisy).sum())}) | noisy / clean | noisy / clean within equal-k strata "
        "| per k: noisy / clean |",
        "|---|---|---|---|---|---|",
    ]
    ratios = {}
    for name, options in WEIGHTINGS.items():
        weights = np.concatenate(
            [advantage_weights(signals=signals, **options)[0].double().numpy() for signals, _, _ in per_batch]
        )[spread]
        ratio = ratios[name] = weight_ratio_by_k(weights, noisy, k)
        per_k = ", ".join(f"{value}: {wn / wc:.2f}" for value, _, _, wn, wc in ratio.strata)
        lines.append(
            f"| {name} | {weights[noisy].mean():.3f} | {weights[~noisy].mean():.3f} | {ratio.raw_ratio:.3f} "
            f"| {ratio.ratio:.3f} | {per_k or 'n/a'} |"
        )
    # the strata depend on the prompts only, the same for every weighting
    counts = ", ".join(f"k = {value}: {n_noisy} / {n_clean}" for value, n_noisy, n_clean, _, _ in ratio.strata)
    return [*lines, "", f"Prompts per stratum holding both (noisy / clean): {counts or 'none'}."], ratios


def batch_variance(module: GRPOModule, batch: RolloutBatch, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``[B]`` gradient variance V of every group (groups without reward spread are 0 without a backward)."""
    advantages, _ = group_advantages(batch.rewards, batch.group_ids, batch.num_groups, mode="grpo")  # [N]
    advantages = advantages.cpu()
    variance = torch.zeros(batch.num_groups, dtype=torch.float64)
    temperature = batch.logprob_temperature  # the distribution the completions were sampled from
    for group in range(batch.num_groups):
        rows = (batch.group_ids == group).nonzero().flatten().tolist()
        if not bool(advantages[rows].ne(0).any()):
            continue
        grads = completion_gradients(
            lambda ids, mask, length: module.completion_logprobs(ids, mask, length, temperature=temperature)[0],
            batch.input_ids,
            batch.attention_mask,
            batch.completion_mask,
            advantages,
            params,
            rows,
        )  # fmt: skip  [G, D]
        variance[group] = gradient_variance(grads, torch.zeros(len(rows), dtype=torch.long), 1)[0]
    return variance


@dataclass(frozen=True)
class Diagnosis:
    """The faithfulness of one policy: correlations, paired differences, what was measured, and (noisy testbed)
    the weights on noisy versus clean prompts."""

    results: dict[str, Faithfulness]
    differences: dict[str, Difference]
    strata: str
    description: str
    noise_lines: list[str]
    noise_ratios: dict[str, WeightRatio]
    spread_prompts: int = 0
    seconds: float = 0.0


def sampling_of(setting: Setting, args: argparse.Namespace) -> SamplingConfig:
    """The setting's sampling, with ``--temperature`` / ``--max-new-tokens`` when given, seeded by ``--seed``."""
    overrides = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    given = {name: value for name, value in overrides.items() if value is not None}
    return SamplingConfig(**{**setting.sampling, **given, "seed": args.seed})


def diagnose(model: str, args: argparse.Namespace, setting: Setting) -> Diagnosis:
    """Sample, score and correlate one policy on ``setting`` (module docstring)."""
    start = time.perf_counter()
    device = torch.device(args.device)
    module = GRPOModule(model=model).to(device)
    rows = setting.load_rows(args.num_prompts, args.seed)
    sampling = sampling_of(setting, args)
    batches = collect(module, rows, setting, args.group_size, sampling, args.chunk or setting.batch_size)
    params = [p for n, p in module.policy.named_parameters() if p.requires_grad and re.search(args.params or "", n)]
    if not params:
        raise ValueError(f"--params {args.params!r} matches no trainable parameter of the policy")
    encoder = None if setting.embeddings == BATCH_SOURCE else SentenceEncoder(setting.embeddings, device=str(device))
    per_signal: dict[str, list[torch.Tensor]] = {}
    variances, lengths, per_batch = [], [], []
    for batch in batches:
        variances.append(batch_variance(module, batch, params))
        chunk_signals = batch_signals(batch, setting, encoder)
        per_batch.append((chunk_signals, batch.rows, _correct_counts(batch)))
        for name, value in chunk_signals.items():
            per_signal.setdefault(name, []).append(value)
        counts = torch.bincount(batch.group_ids, minlength=batch.num_groups).clamp(min=1)
        lengths.append(
            torch.zeros(batch.num_groups).index_add_(0, batch.group_ids, batch.completion_mask.sum(-1).cpu()) / counts
        )
    signals = {name: torch.cat(parts) for name, parts in per_signal.items()}
    binary = all(k is not None for *_, k in per_batch)
    strata = np.concatenate([k for *_, k in per_batch]) if binary else None
    common = (signals, torch.cat(variances), signals["rd"], torch.cat(lengths))
    options = {"strata": strata, "resamples": args.resamples, "seed": args.seed}
    results = faithfulness(*common, **options)
    differences = correlation_differences(*common, DIFFERENCES, **options)
    spread = int((signals["rd"] > 0).sum())
    stop = f", stop at {', '.join(map(repr, sampling.stop))}" if sampling.stop else ""
    seconds = time.perf_counter() - start
    description = (
        f"{len(rows)} prompts ({setting.label}) x G = {args.group_size} at temperature {sampling.temperature}, up to "
        f"{sampling.max_new_tokens} tokens{stop}; reward {' + '.join(_weighted(setting))}; {setting.clustering} "
        f"clusters, embeddings: {setting.embeddings}; {spread} prompts have RD > 0; V over "
        f"{sum(p.numel() for p in params):,} parameters; {seconds:.0f} s"
    )
    noise_lines, noise_ratios = weights_by_noise(per_batch) if setting.noisy else ([], {})
    return Diagnosis(
        results, differences, "k" if binary else "RD", description, noise_lines, noise_ratios, spread, seconds
    )


def _weighted(setting: Setting) -> list[str]:
    weights = setting.reward_weights or [1.0] * len(setting.rewards)
    return [
        name if weight == 1 else f"{weight:g} x {name}" for name, weight in zip(setting.rewards, weights, strict=True)
    ]


def _correct_counts(batch: RolloutBatch) -> np.ndarray | None:
    """``[B]`` k correct completions per group for 0/1 rewards; None for other rewards (strata fall back to RD)."""
    try:
        return correct_counts(batch.rewards.cpu(), batch.group_ids.cpu(), batch.num_groups)
    except ValueError:
        return None
