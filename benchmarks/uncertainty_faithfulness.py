"""Does an uncertainty signal track the variance of the policy gradient? (METHODS.md section 6)

A thin script over ``lit_gcpo.algorithms.faithfulness``. For every prompt (the arithmetic task's validation problems,
the noisy testbed's training problems, or a JSONL file with ``prompt``/``answer``), G completions are sampled from
the policy (``HFEngine`` + ``RolloutCollector``), rewarded, and scored by ``GRPOModule.score_rollout``
(generating-policy log-probs and mean-pooled last hidden states, as in training); the signals come from
``uncertainty_signals`` with the training defaults (answer clusters, Rao SE, embeddings centred over each chunk
of prompts, METHODS.md §5.1); V from ``completion_gradients`` + ``gradient_variance`` with GRPO advantages;
the correlations, bootstrap intervals, RD strata and the length control from ``faithfulness``.

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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import resolve_policy, run_header, write_results_section

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.algorithms.clustering import answer_clusters
from lit_gcpo.algorithms.faithfulness import LENGTH, Faithfulness, completion_gradients, faithfulness, gradient_variance
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
    LENGTH: "mean completion length (control)",
}
NOISY_REWARD = "lit_gcpo.tasks.noisy_arithmetic:noisy_math_accuracy"


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
        module.score_rollout(batch, with_reference=False)  # old_logprobs [N, L], embeddings [N, H]
        batches.append(batch)
    return batches


def batch_signals(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """``[B]`` SE, CD, BoT, RD, U_c (BoT and CD) of every group, as the callback computes them in training."""
    clusters = answer_clusters(batch.answers, batch.group_ids)  # [N]
    signals, _ = uncertainty_signals(
        batch.group_ids, batch.num_groups, rewards=batch.rewards, cluster_ids=clusters,
        embeddings=batch.embeddings, seq_logprobs=batch.seq_logprobs, se_kind="rao", geometric="bot", center="batch",
    )  # fmt: skip
    signals["u_c_cd"] = calibrated_uncertainty(signals["cd"], signals["rd"])
    return {name: signals[name].detach().double().cpu() for name in [*SIGNAL_LABELS, "se_n"] if name != LENGTH}


WEIGHTINGS = {
    "seed_grpo": {"method": "seed_grpo"},
    "seed_grpo_sf": {"method": "seed_grpo", "alpha": 1.0, "scale": "batch_mean", "normalise": True},
    "gcpo_bot": {"method": "gcpo", "geometric": "bot"},
    "gcpo_cd": {"method": "gcpo", "geometric": "cd"},
    "rd_only": {"method": "rd_only"},
}


def weights_by_noise(per_batch: list[tuple[dict[str, torch.Tensor], list[dict]]]) -> list[str]:
    """Mean weight of each weighting on the noisy and on the clean prompts with RD > 0 (noisy testbed): does it
    damp the prompts whose rewards are coin flips? Each chunk of prompts is one step's weighting."""
    sums = {name: {"noisy": 0.0, "clean": 0.0} for name in WEIGHTINGS}
    counts = {"noisy": 0, "clean": 0}
    for signals, rows in per_batch:
        noisy = torch.tensor([float(row.get("noise_rate") or 0.0) > 0 for row in rows])
        spread = signals["rd"] > 0
        counts["noisy"] += int((spread & noisy).sum())
        counts["clean"] += int((spread & ~noisy).sum())
        for name, options in WEIGHTINGS.items():
            weights, _ = advantage_weights(signals=signals, **options)
            sums[name]["noisy"] += float(weights.double()[spread & noisy].sum())
            sums[name]["clean"] += float(weights.double()[spread & ~noisy].sum())
    lines = [
        f"| weighting | mean weight, noisy prompts with RD > 0 (n = {counts['noisy']}) "
        f"| mean weight, clean prompts with RD > 0 (n = {counts['clean']}) | noisy / clean |",
        "|---|---|---|---|",
    ]
    for name, total in sums.items():
        noisy_mean = total["noisy"] / max(counts["noisy"], 1)
        clean_mean = total["clean"] / max(counts["clean"], 1)
        lines.append(f"| {name} | {noisy_mean:.3f} | {clean_mean:.3f} | {noisy_mean / max(clean_mean, 1e-12):.3f} |")
    return lines


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


def diagnose(model: str, args: argparse.Namespace, testbed: str) -> tuple[dict[str, Faithfulness], str, list[str]]:
    """The faithfulness table of one policy, a one-line description of what was measured, and (noisy testbed)
    the weights on noisy versus clean prompts."""
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
        per_batch.append((chunk_signals, batch.rows))
        for name, value in chunk_signals.items():
            per_signal.setdefault(name, []).append(value)
        counts = torch.bincount(batch.group_ids, minlength=batch.num_groups).clamp(min=1)
        lengths.append(
            torch.zeros(batch.num_groups).index_add_(0, batch.group_ids, batch.completion_mask.sum(-1).cpu()) / counts
        )
    signals = {name: torch.cat(parts) for name, parts in per_signal.items()}
    results = faithfulness(
        signals, torch.cat(variances), signals["rd"], torch.cat(lengths), resamples=args.resamples, seed=args.seed
    )
    spread = int((signals["rd"] > 0).sum())
    description = (
        f"{len(rows)} prompts ({testbed if args.prompts is None else args.prompts}) x G = {args.group_size} at "
        f"temperature {args.temperature}, up to {args.max_new_tokens} tokens; {spread} prompts have RD > 0; V over "
        f"{sum(p.numel() for p in params):,} parameters; {time.perf_counter() - start:.0f} s"
    )
    return results, description, weights_by_noise(per_batch) if testbed == "noisy" else []


def table(results: dict[str, Faithfulness]) -> list[str]:
    lines = [
        "| signal | Spearman with V, all prompts | prompts with RD > 0 | same, within equal-RD strata |",
        "|---|---|---|---|",
    ]
    for name, label in SIGNAL_LABELS.items():
        row = results[name]
        lines.append(f"| {label} | {row.all_prompts} | {row.spread_prompts} | {row.within_rd} |")
    return lines


def reading(results: dict[str, Faithfulness]) -> str:
    """Plain words derived from the numbers only (intervals decide, not point estimates)."""
    spread = {n: r.spread_prompts for n, r in results.items()}
    within = {n: r.within_rd for n, r in results.items()}
    se, bot, length = spread["se"], spread["bot"], spread[LENGTH]
    separated = se.high < bot.low or bot.high < se.low
    beats_length = [n for n in ("se", "cd", "bot", "u_c", "u_c_cd") if spread[n].value > length.value]
    positive_within = [n for n in ("se", "cd", "bot", "u_c") if within[n].low > 0]
    return (
        "Reading (generated from the numbers): on the prompts with RD > 0, BoT "
        + (
            f"{'exceeds' if bot.value > se.value else 'trails'} SE with non-overlapping intervals"
            if separated
            else "and SE have overlapping intervals (not separated)"
        )
        + f"; above the length control ({length.value:+.2f}): {', '.join(beats_length) or 'none'}; within equal-RD "
        f"strata, intervals above 0: {', '.join(positive_within) or 'none'}. A signal that does no better than length "
        "is no evidence for geometry; one policy and one task per row, not a verdict on the paper."
    )


def compare_rows(args: argparse.Namespace) -> list[str]:
    """One row per final policy of compare_methods.py (seed ``--policy-seed``): rho on the RD > 0 prompts."""
    root = Path(args.compare_dir)
    lines = [
        "| testbed | method | prompts with RD > 0 | SE | CD | BoT | U_c (BoT) | length (control) "
        "| BoT within RD strata |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in sorted(root.glob(f"*/*/seed{args.policy_seed}/policy")):
        testbed, method = policy.parts[-4], policy.parts[-3]
        results, description, _ = diagnose(str(policy), args, testbed)
        spread = re.search(r"(\d+) prompts have RD > 0", description).group(1)
        cells = [str(results[n].spread_prompts) for n in ("se", "cd", "bot", "u_c", LENGTH)]
        lines.append(f"| {testbed} | {method} | {spread} | {' | '.join(cells)} | {results['bot'].within_rd} |")
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
            f"[paired percentile-bootstrap 95% interval, {args.resamples} resamples]. Total "
            f"{(time.perf_counter() - start) / 60:.1f} min.", "", *lines,
        ]  # fmt: skip
        print("\n".join(section))
        if not args.no_write:
            write_results_section(f"{SECTION}.compare", section)
        return
    policy = resolve_policy(args.model)
    results, description, noise_lines = diagnose(policy.path, args, args.testbed)
    if noise_lines:
        title = "Weights on the noisy versus the clean training prompts (each chunk of prompts weighted as one step):"
        noise_lines = ["", title, "", *noise_lines]
    section = SECTION if args.testbed == "arithmetic" and args.prompts is None else f"{SECTION}.{args.testbed}"
    lines = [
        f"## Uncertainty faithfulness (uncertainty_faithfulness.py, {args.testbed})", "", run_header(),
        f"Policy: {policy.description}. {description}. Values are Spearman rho [paired percentile-bootstrap 95% "
        f"interval, {args.resamples} resamples over prompts].", "", *table(results), "", reading(results),
        *noise_lines,
    ]  # fmt: skip
    print("\n".join(lines))
    if not args.no_write:
        write_results_section(section, lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
