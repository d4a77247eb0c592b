"""Does an uncertainty signal track the variance of the policy gradient? (METHODS.md section 6)

A thin script over ``lit_gcpo.algorithms.faithfulness``. For every prompt (the arithmetic task's validation problems,
the noisy testbed's training problems, or a JSONL file with ``prompt``/``answer``), G completions are sampled from
the policy (``HFEngine`` + ``RolloutCollector``), rewarded, and scored by ``GRPOModule.score_rollout``
(generating-policy log-probs and mean-pooled last hidden states, as in training); the signals come from
``uncertainty_signals`` with the training defaults (answer clusters, Rao SE, embeddings centred over each chunk
of prompts, METHODS.md §5.1); V from ``completion_gradients`` + ``gradient_variance`` with GRPO advantages;
the correlations (all prompts, RD > 0, within strata of k correct completions, partial for length), the
paired differences between signals and the bootstrap intervals from ``faithfulness`` and
``correlation_differences``; on the noisy testbed, each weighting's weights on noisy versus clean prompts of equal
k from ``weight_ratio_by_k``.

    python benchmarks/uncertainty_faithfulness.py                          # starting tiny policy, 1024 x 8
    python benchmarks/uncertainty_faithfulness.py --compare-dir runs/compare_methods --steps 40
        # the final policies of compare_methods.py (seed 0 of every testbed and method), 256 prompts each
    python benchmarks/uncertainty_faithfulness.py --model PATH --device cuda --prompts data.jsonl \\
        --params 'lm_head|layers\\.2[0-9]\\.'
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
from _common import resolve_policy, run_header, write_results_section

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.clustering import answer_clusters
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
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.rewards import RewardSet
from lit_gcpo.training.module import GRPOModule

SECTION = "uncertainty_faithfulness"
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
NOISY_REWARD = "lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"
DIFFERENCES = (
    ("bot", "se"), ("cd", "se"), ("u_c", "se"), ("u_c", "rd"), ("bot", LENGTH), ("se", LENGTH),
    ("token_entropy", "se"), ("token_entropy", LENGTH),
)  # fmt: skip


def load_rows(testbed: str, prompts: str | None, num_prompts: int, seed: int) -> tuple[list[dict], str]:
    """The prompt rows and the reward that scores them."""
    if prompts is not None:
        from lit_gcpo.data.sources import LocalFiles

        rows = LocalFiles(prompts, limit=num_prompts).load()
        for index, row in enumerate(rows):
            if not row.get("prompt") or row.get("answer") is None:
                raise ValueError(f"{prompts}: row {index} needs non-empty 'prompt' and 'answer' fields")
        return rows, "math_accuracy"
    if testbed == "noisy":  # the training prompts, where the noise is
        from lit_gcpo.tasks.noisy_arithmetic import NoisyArithmeticTask

        return NoisyArithmeticTask("train", num_train=5000, seed=seed).load()[:num_prompts], NOISY_REWARD
    from lit_gcpo.tasks.arithmetic import arithmetic_splits

    return arithmetic_splits(0, num_prompts, seed=seed)[1], "math_accuracy"


def collect(module: GRPOModule, rows: list[dict], reward: str, group_size: int, sampling: SamplingConfig, chunk: int):
    """Sample, reward and score G completions for every row, ``chunk`` prompts per generate call."""
    rewards = RewardSet.from_names([reward])
    collector = RolloutCollector(HFEngine(module.policy, module.tokenizer), module.tokenizer, rewards)
    batches: list[RolloutBatch] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        prompt_batch = PromptBatch([r["prompt"] for r in part], part, list(range(start, start + len(part))))
        seeded = SamplingConfig(**{**vars(sampling), "seed": sampling.seed + start})
        batch = collector.collect(prompt_batch, group_size, seeded, module.device)
        module.score_rollout(batch, with_reference=False)  # old_logprobs, embeddings, token summaries
        batches.append(batch)
    return batches


def batch_signals(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """``[B]`` SE, CD, BoT, RD, U_c (BoT and CD) of every group, as the callback computes them in training, and the
    label-free methods' signals (majority agreement, cluster share, mean self-certainty and token entropy: the group
    means of their rewards, from the scoring pass's token summaries)."""
    clusters = answer_clusters(batch.answers, batch.group_ids)  # [N]
    signals, _ = uncertainty_signals(
        batch.group_ids, batch.num_groups, rewards=batch.rewards, cluster_ids=clusters,
        embeddings=batch.embeddings, seq_logprobs=batch.seq_logprobs, se_kind="rao", geometric="bot", center="batch",
    )  # fmt: skip
    signals["u_c_cd"] = calibrated_uncertainty(signals["cd"], signals["rd"])
    answered = torch.tensor([answer not in (None, "") for answer in batch.answers], device=clusters.device)
    signals |= label_free_signals(
        clusters, batch.group_ids, batch.num_groups, answered, token_entropy=batch.token_entropy,
        token_mean_logprob=batch.token_mean_logprob, mask=batch.completion_mask, vocab_size=batch.vocab_size,
    )  # fmt: skip
    return {name: signals[name].detach().double().cpu() for name in [*SIGNAL_LABELS, "se_n"] if name != LENGTH}


WEIGHTINGS = {
    "seed_grpo": {"method": "seed_grpo"},
    "seed_grpo_sf": {"method": "seed_grpo", "alpha": 1.0, "scale": "batch_mean", "normalise": True},
    "gcpo_bot": {"method": "gcpo", "geometric": "bot"},
    "gcpo_cd": {"method": "gcpo", "geometric": "cd"},
    "rd_only": {"method": "rd_only"},
}


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


def diagnose(model: str, args: argparse.Namespace, testbed: str) -> Diagnosis:
    """Sample, score and correlate one policy (module docstring)."""
    start = time.perf_counter()
    device = torch.device(args.device)
    module = GRPOModule(model=model).to(device)
    rows, reward = load_rows(testbed, args.prompts, args.num_prompts, args.seed)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    batches = collect(module, rows, reward, args.group_size, sampling, args.chunk)
    params = [p for n, p in module.policy.named_parameters() if p.requires_grad and re.search(args.params or "", n)]
    if not params:
        raise ValueError(f"--params {args.params!r} matches no trainable parameter of the policy")
    per_signal: dict[str, list[torch.Tensor]] = {}
    variances, lengths, per_batch = [], [], []
    for batch in batches:
        variances.append(batch_variance(module, batch, params))
        chunk_signals = batch_signals(batch)
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
    description = (
        f"{len(rows)} prompts ({testbed if args.prompts is None else args.prompts}) x G = {args.group_size} at "
        f"temperature {args.temperature}, up to {args.max_new_tokens} tokens; {spread} prompts have RD > 0; V over "
        f"{sum(p.numel() for p in params):,} parameters; {time.perf_counter() - start:.0f} s"
    )
    noise_lines, noise_ratios = weights_by_noise(per_batch) if testbed == "noisy" else ([], {})
    return Diagnosis(results, differences, "k" if binary else "RD", description, noise_lines, noise_ratios)


def _correct_counts(batch: RolloutBatch) -> np.ndarray | None:
    """``[B]`` k correct completions per group for 0/1 rewards; None for other rewards (strata fall back to RD)."""
    try:
        return correct_counts(batch.rewards.cpu(), batch.group_ids.cpu(), batch.num_groups)
    except ValueError:
        return None


def table(diagnosis: Diagnosis) -> list[str]:
    """The correlation table, then the paired differences between signals."""
    strata = diagnosis.strata
    lines = [
        f"| signal | Spearman with V, all prompts | prompts with RD > 0 | same, within equal-{strata} strata "
        "| same as RD > 0, partial for completion length |",
        "|---|---|---|---|---|",
    ]
    for name, label in SIGNAL_LABELS.items():
        row = diagnosis.results[name]
        cells = (row.all_prompts, row.spread_prompts, row.within_strata, row.partial_length)
        lines.append(f"| {label} | {' | '.join(map(str, cells))} |")
    lines += [
        "",
        f"| difference of Spearman with V | prompts with RD > 0 | within equal-{strata} strata |",
        "|---|---|---|",
    ]
    for name, difference in diagnosis.differences.items():
        lines.append(f"| {name} | {difference.spread_prompts} | {difference.within_strata} |")
    return lines


def reading(diagnosis: Diagnosis) -> str:
    """Plain words derived from the numbers only (intervals decide, not point estimates)."""
    results, differences = diagnosis.results, diagnosis.differences
    versus_se = differences["bot - se"].spread_prompts
    length = results[LENGTH].spread_prompts
    above_length = [n for n in ("se", "bot") if differences[f"{n} - {LENGTH}"].spread_prompts.low > 0]
    partial = [n for n in ("se", "cd", "bot", "u_c") if results[n].partial_length.low > 0]
    positive_within = [n for n in ("se", "cd", "bot", "u_c") if results[n].within_strata.low > 0]
    if versus_se.excludes_zero:
        verdict = f"{'exceeds' if versus_se.low > 0 else 'trails'} SE's (paired interval of the difference {versus_se})"
    else:
        verdict = f"is not separated from SE's (paired interval of the difference {versus_se} covers 0)"
    return (
        f"Reading (generated from the numbers): on the prompts with RD > 0, BoT's correlation with V {verdict}; "
        f"paired interval above the length control ({length.value:+.2f}): {', '.join(above_length) or 'none'} (of "
        f"SE, BoT); partial correlation for length above 0: {', '.join(partial) or 'none'}; within equal-"
        f"{diagnosis.strata} strata, intervals above 0: {', '.join(positive_within) or 'none'}. A signal that does no "
        "better than length is no evidence for geometry; one policy and one task per row, not a verdict on the paper."
    )


def compare_rows(args: argparse.Namespace) -> list[str]:
    """One row per final policy of compare_methods.py (seed ``--policy-seed``): rho on the RD > 0 prompts."""
    root = Path(args.compare_dir)
    lines = [
        "| testbed | method | prompts with RD > 0 | SE | CD | BoT | U_c (BoT) | length (control) | BoT - SE (paired) "
        "| BoT partial for length | BoT within k strata | own weights, noisy / clean within equal k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in sorted(root.glob(f"*/*/seed{args.policy_seed}/policy")):
        testbed, method = policy.parts[-4], policy.parts[-3]
        diagnosis = diagnose(str(policy), args, testbed)
        results = diagnosis.results
        spread = re.search(r"(\d+) prompts have RD > 0", diagnosis.description).group(1)
        cells = [str(results[n].spread_prompts) for n in ("se", "cd", "bot", "u_c", LENGTH)]
        cells += [str(diagnosis.differences["bot - se"].spread_prompts), str(results["bot"].partial_length)]
        cells.append(str(results["bot"].within_strata))
        own = diagnosis.noise_ratios.get(method)
        cells.append(f"{own.ratio:.3f}" if own is not None else "—")
        lines.append(f"| {testbed} | {method} | {spread} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lit-gcpo/tiny-arith", help="HF model name/path or the tiny alias")
    parser.add_argument("--testbed", default="arithmetic", choices=("arithmetic", "noisy"))
    parser.add_argument("--prompts", default=None, help="JSONL with prompt/answer (default: the testbed's)")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=32, help="prompts per generate call (= a training step's)")
    parser.add_argument("--params", default=None, help="regex of parameter names whose gradients count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-dir", default=None, help="diagnose the final policies of compare_methods.py")
    parser.add_argument("--policy-seed", type=int, default=0, help="which seed's policies (with --compare-dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.compare_dir is not None:
        start = time.perf_counter()
        lines = compare_rows(args)
        section = [
            "## Faithfulness of the compared policies (uncertainty_faithfulness.py --compare-dir)", "", run_header(),
            f"The final policy of seed {args.policy_seed} of every testbed and method of compare_methods.py; "
            f"{args.num_prompts} prompts x G = {args.group_size} each (the testbed's training prompts for `noisy`, "
            f"the validation prompts for `arithmetic`); Spearman rho of each signal with V on the prompts with RD > 0 "
            f"[percentile-bootstrap 95% interval, {args.resamples} resamples over prompts]; BoT - SE: the difference "
            f"of their correlations with its paired interval (same resampled prompts); strata by k correct. Total "
            f"{(time.perf_counter() - start) / 60:.1f} min.", "", *lines,
        ]  # fmt: skip
        print("\n".join(section))
        if not args.no_write:
            write_results_section(f"{SECTION}.compare", section)
        return
    policy = resolve_policy(args.model)
    diagnosis = diagnose(policy.path, args, args.testbed)
    noise_lines = diagnosis.noise_lines
    if noise_lines:
        title = "Weights on the noisy versus the clean training prompts (each chunk of prompts weighted as one step):"
        noise_lines = ["", title, "", *noise_lines]
    section = SECTION if args.testbed == "arithmetic" and args.prompts is None else f"{SECTION}.{args.testbed}"
    lines = [
        f"## Uncertainty faithfulness (uncertainty_faithfulness.py, {args.testbed})", "", run_header(),
        f"Policy: {policy.description}. {diagnosis.description}. Values are Spearman rho [percentile-bootstrap 95% "
        f"interval, {args.resamples} resamples over prompts, the same resampled prompts for every signal, so the "
        f"differences' intervals are paired]; strata by {diagnosis.strata} "
        f"({'the number of correct completions' if diagnosis.strata == 'k' else 'RD, which merges k and G - k'}); "
        "the partial correlation ranks V, the signal and the mean completion length and correlates the residuals of "
        "V and the signal after the ranked length is regressed out.", "", *table(diagnosis), "", reading(diagnosis),
        *noise_lines,
    ]  # fmt: skip
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(section, lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
