"""Does an uncertainty signal track the variance of the policy gradient? (METHODS.md section 6)

For every prompt of the arithmetic task (or of a JSONL file with ``prompt``/``answer``), G completions are
sampled from the policy (``HFEngine`` + ``RolloutCollector``), rewarded with ``math_accuracy`` and scored by
``GRPOModule.score_rollout`` (generating-policy log-probs and the mean-pooled last hidden state, exactly as in
training). With GRPO advantages A_i (``group_advantages``), the per-completion gradient is

    g_i = A_i * grad_theta sum_t m_{i,t} log pi(o_{i,t})        (one backward per completion)

and the variance of the group's gradient estimate is V = 1 / (G (G - 1)) sum_i |g_i - g_bar|^2, over the
flattened gradients of all trainable parameters (or of those whose name matches ``--params``, for big
models). The signals SE (Rao, answer clustering), CD, BoT, RD and U_c = BoT (1 - RD) come from
``lit_gcpo.uncertainty.uncertainty_signals``; U_c with CD and the mean completion length (a control: longer
completions have larger gradients) are added. The script reports each one's Spearman correlation with V over
prompts, with a paired percentile bootstrap 95% CI, over all prompts and over prompts with RD > 0.

Read the "all prompts" column with care: a group without reward spread has A = 0, hence V = 0 exactly, so over
all prompts any signal that separates RD = 0 from RD > 0 groups correlates with V for that reason alone (RD
does so by construction). The RD > 0 column is the test of the claim.

    python benchmarks/uncertainty_faithfulness.py                       # tiny policy, 1024 prompts x 8
    python benchmarks/uncertainty_faithfulness.py --model PATH --device cuda --prompts data.jsonl \\
        --params 'lm_head|layers\\.2[0-9]\\.'
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIGURES, resolve_policy, run_header, write_results_section

from lit_gcpo.advantages import group_advantages
from lit_gcpo.batch import PromptBatch, RolloutBatch
from lit_gcpo.clustering import answer_clusters
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.module import GRPOModule
from lit_gcpo.rewards import RewardSet
from lit_gcpo.uncertainty import calibrated_uncertainty, uncertainty_signals

SECTION = "uncertainty_faithfulness"
# Signals in report order, with the label of the table.
SIGNAL_LABELS = {
    "se": "SE (Rao, answer clusters)",
    "cd": "CD (policy embeddings)",
    "bot": "BoT (policy embeddings)",
    "rd": "RD",
    "u_c": "U_c = BoT (1 - RD)",
    "u_c_cd": "U_c with CD = CD (1 - RD)",
    "length": "mean completion length (control)",
}


def load_rows(prompts: str | None, num_prompts: int, seed: int) -> list[dict]:
    """The prompt rows: ``num_prompts`` validation problems of the arithmetic task, or a JSONL file's rows."""
    if prompts is None:
        from lit_gcpo.tasks.arithmetic import arithmetic_splits

        return arithmetic_splits(0, num_prompts, seed=seed)[1]
    from lit_gcpo.data.sources import LocalFiles

    rows = LocalFiles(prompts, limit=num_prompts).load()
    for index, row in enumerate(rows):
        if not row.get("prompt") or row.get("answer") is None:
            raise ValueError(f"{prompts}: row {index} needs non-empty 'prompt' and 'answer' fields")
    return rows


def collect(
    module: GRPOModule, rows: list[dict], group_size: int, sampling: SamplingConfig, chunk: int, device: torch.device
) -> list[RolloutBatch]:
    """Sample, reward and score G completions for every row, ``chunk`` prompts per generate call."""
    collector = RolloutCollector(
        HFEngine(module.policy, module.tokenizer), module.tokenizer, RewardSet.from_names(["math_accuracy"])
    )
    batches = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        prompt_batch = PromptBatch([r["prompt"] for r in part], part, list(range(start, start + len(part))))
        seeded = SamplingConfig(**{**vars(sampling), "seed": sampling.seed + start})
        batch = collector.collect(prompt_batch, group_size, seeded, device)
        module.score_rollout(batch, with_reference=False)  # old_logprobs [N, L], embeddings [N, H]
        batches.append(batch)
    return batches


def selected_parameters(module: GRPOModule, pattern: str | None) -> list[torch.nn.Parameter]:
    params = [(n, p) for n, p in module.policy.named_parameters() if p.requires_grad]
    if pattern:
        params = [(n, p) for n, p in params if re.search(pattern, n)]
    if not params:
        raise ValueError(f"--params {pattern!r} matches no trainable parameter of the policy")
    return [p for _, p in params]


def group_gradients(
    module: GRPOModule, batch: RolloutBatch, advantages: torch.Tensor, params: list[torch.nn.Parameter], group: int
) -> torch.Tensor:
    """``[G, D]`` float64 g_i = A_i grad sum_t m log pi(o_i,t) of one group, one backward per completion.

    Each row is run alone with its padding cut off (left prompt padding, right completion padding), so that
    no gradient of one completion leaks into another's; rows with A_i = 0 are zero without a backward.
    """
    rows = (batch.group_ids == group).nonzero().flatten().tolist()
    dim = sum(p.numel() for p in params)
    grads = torch.zeros(len(rows), dim, dtype=torch.float64)  # [G, D]
    prompt_len = batch.prompt_length
    for position, row in enumerate(rows):
        length = int(batch.completion_mask[row].sum())
        if advantages[row] == 0 or length == 0:
            continue
        attn = batch.attention_mask[row, : prompt_len + length]
        first = int(attn.nonzero()[0])  # drop the left padding of the prompt
        ids = batch.input_ids[row : row + 1, first : prompt_len + length]  # [1, P' + L']
        logprobs, _, _ = module.completion_logprobs(ids, attn[None, first:], length)  # [1, L']
        parts = torch.autograd.grad(logprobs.sum(), params, allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(parts, params, strict=True)]
        )
        grads[position] = flat.double() * float(advantages[row])
    return grads


def gradient_variance(
    module: GRPOModule, batch: RolloutBatch, advantages: torch.Tensor, params: list[torch.nn.Parameter]
) -> torch.Tensor:
    """``[B]`` V = 1 / (G (G - 1)) sum_i |g_i - g_bar|^2 per group; exactly 0 when every A_i of it is 0."""
    variance = torch.zeros(batch.num_groups, dtype=torch.float64)
    for group in range(batch.num_groups):
        members = batch.group_ids == group  # [N]
        size = int(members.sum())
        if size < 2 or not bool(advantages[members].ne(0).any()):
            continue
        grads = group_gradients(module, batch, advantages, params, group)  # [G, D]
        centred = grads - grads.mean(0, keepdim=True)  # [G, D]
        variance[group] = centred.pow(2).sum() / (size * (size - 1))
    return variance


def check_per_sample_gradients(
    module: GRPOModule, batch: RolloutBatch, advantages: torch.Tensor, params: list[torch.nn.Parameter]
) -> float:
    """Relative error between sum_i g_i of the per-row backwards and ONE backward of sum_i A_i sum_t m log pi
    over the group's padded rows together (the batched path of training): both must agree, or the per-row
    cutting of padding changed the model's computation. Checked on the first group with reward spread."""
    spread = [g for g in range(batch.num_groups) if bool(advantages[batch.group_ids == g].ne(0).any())]
    if not spread:
        return 0.0
    group = spread[0]
    rows = (batch.group_ids == group).nonzero().flatten()
    logprobs, _, _ = module.completion_logprobs(
        batch.input_ids[rows], batch.attention_mask[rows], batch.completion_mask.shape[1]
    )  # [G, L]
    weighted = (logprobs * batch.completion_mask[rows]).sum(-1) @ advantages[rows].to(logprobs.dtype)
    batched = torch.cat([g.flatten() for g in torch.autograd.grad(weighted, params)]).double()  # [D]
    summed = group_gradients(module, batch, advantages, params, group).sum(0)  # [D]
    return float((summed - batched).norm() / batched.norm().clamp(min=1e-30))


def group_signals(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """``[B]`` SE, CD, BoT, RD, U_c (BoT and CD) and the mean completion length of every group."""
    cluster_ids = answer_clusters(batch.answers, batch.group_ids)  # [N]
    signals, _ = uncertainty_signals(
        batch.group_ids,
        batch.num_groups,
        rewards=batch.rewards,
        cluster_ids=cluster_ids,
        embeddings=batch.embeddings,
        seq_logprobs=batch.seq_logprobs,
        se_kind="rao",
        geometric="bot",
    )
    signals["u_c_cd"] = calibrated_uncertainty(signals["cd"], signals["rd"])
    lengths = batch.completion_mask.sum(-1)  # [N]
    counts = torch.bincount(batch.group_ids, minlength=batch.num_groups).clamp(min=1)
    signals["length"] = torch.zeros(batch.num_groups).index_add_(0, batch.group_ids, lengths) / counts
    return {name: signals[name].detach().double().cpu() for name in SIGNAL_LABELS}


def stratified_spearman(x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> float:
    """Spearman rho of (x, y) within strata: the ranks of x and y centred in every stratum, then correlated.

    With the strata = groups of equal RD (for 0/1 rewards: the number of correct completions), this asks
    whether a signal tracks V beyond what the reward pattern, which fixes the advantages, already explains.
    NaN when nothing varies within the strata.
    """
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    for value in np.unique(strata):
        members = strata == value
        rank_x[members] -= rank_x[members].mean()
        rank_y[members] -= rank_y[members].mean()
    scale = math.sqrt(float((rank_x**2).sum() * (rank_y**2).sum()))
    return float((rank_x * rank_y).sum() / scale) if scale > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan  # no variation: no rank correlation
    return float(stats.spearmanr(x, y).statistic)


def with_bootstrap_ci(
    statistic: Callable[..., float], samples: tuple[np.ndarray, ...], resamples: int, seed: int
) -> tuple[float, float, float]:
    """``statistic(*samples)`` and a paired percentile-bootstrap 95% CI over the prompts (NaN if undefined)."""
    value = statistic(*samples)
    if len(samples[0]) < 3 or math.isnan(value):
        return value, math.nan, math.nan
    result = stats.bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    # percentile CI over the resamples where the statistic is defined (scipy's own interval is NaN if any is)
    low, high = np.nanpercentile(result.bootstrap_distribution, [2.5, 97.5])
    return value, float(low), float(high)


def _fmt(rho: float, low: float, high: float) -> str:
    return "n/a" if math.isnan(rho) else f"{rho:+.3f} [{low:+.3f}, {high:+.3f}]"


def reading(results: dict[str, tuple[tuple[float, float, float], ...]], spread: np.ndarray) -> str:
    """A plain-words reading of the table, derived from the numbers only (CIs decide, not point estimates)."""

    def verdict(name: str, column: int) -> str:
        rho, low, high = results[name][column]
        if math.isnan(rho):
            return f"{name} n/a"
        sign = "> 0" if low > 0 else "< 0" if high < 0 else "CI includes 0"
        return f"{name} {rho:+.2f} ({sign})"

    names = [n for n in ("se", "cd", "bot", "rd", "u_c", "u_c_cd", "length") if not math.isnan(results[n][1][0])]
    se_ci, bot_ci = results["se"][1], results["bot"][1]
    overlap = not (se_ci[1] > bot_ci[2] or bot_ci[1] > se_ci[2])
    return (
        "Reading (generated from the numbers). Over all prompts every correlation is dominated by the "
        f"{int((~spread).sum())} groups without reward spread, where A = 0 and V = 0 by construction: RD ranks "
        "them first, and any signal that is low on all-correct or all-wrong groups inherits that, so that column "
        f"says nothing about the claim. On the {int(spread.sum())} prompts with RD > 0: "
        + ", ".join(verdict(n, 1) for n in names)
        + ". BoT versus SE there: their 95% CIs "
        + ("overlap, so this run does not separate them" if overlap else "do not overlap")
        + ". Within groups of equal RD (which, for 0/1 rewards, fixes the advantages and so most of V's scale): "
        + ", ".join(verdict(n, 2) for n in names if n != "rd")
        + ". "
        + _against_length(results)
        + " A signal that does no better than the completion-length control is no evidence for geometry. One "
        "policy, one task, one seed: a diagnostic of this setting, not a verdict on the GCPO paper's claim."
    )


def _against_length(results: dict[str, tuple[tuple[float, float, float], ...]]) -> str:
    """Which uncertainty signals beat the completion-length control on the RD > 0 prompts (point estimates)."""
    control = results["length"][1][0]
    names = [n for n in ("se", "cd", "bot", "u_c", "u_c_cd") if not math.isnan(results[n][1][0])]
    above = [n for n in names if results[n][1][0] > control]
    if not above:
        return f"No uncertainty signal beats the length control (rho {control:+.2f}) on the RD > 0 prompts."
    return f"Above the length control (rho {control:+.2f}) on the RD > 0 prompts: {', '.join(above)}."


def scatter_plot(values: dict[str, np.ndarray], variance: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = values["rd"] > 0
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.6), sharey=True)
    for axis, name in zip(axes, ("se", "cd", "bot", "rd", "u_c"), strict=True):
        axis.scatter(values[name][spread], variance[spread], s=8, alpha=0.6)
        axis.set_xlabel(SIGNAL_LABELS[name])
        axis.set_yscale("log")
    axes[0].set_ylabel("gradient variance V (RD > 0 prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lit-gcpo/tiny-arith", help="HF model name/path or the tiny alias")
    parser.add_argument("--prompts", default=None, help="JSONL with prompt/answer (default: the arithmetic task)")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--params", default=None, help="regex of parameter names whose gradients count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    policy = resolve_policy(args.model)
    device = torch.device(args.device)
    module = GRPOModule(model=policy.path, temperature=args.temperature, policy_embeddings=True).to(device)
    rows = load_rows(args.prompts, args.num_prompts, args.seed)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    batches = collect(module, rows, args.group_size, sampling, args.chunk, device)
    sample_s = time.perf_counter() - start

    params = selected_parameters(module, args.params)
    num_params = sum(p.numel() for p in params)
    first_advantages, _ = group_advantages(batches[0].rewards, batches[0].group_ids, batches[0].num_groups)
    check = check_per_sample_gradients(module, batches[0], first_advantages, params)
    if check > 1e-3:
        raise RuntimeError(f"per-completion gradients disagree with the batched gradient (relative error {check:.2e})")
    per_signal: dict[str, list[torch.Tensor]] = {name: [] for name in SIGNAL_LABELS}
    variances, accuracies = [], []
    for batch in batches:
        advantages, _ = group_advantages(batch.rewards, batch.group_ids, batch.num_groups, mode="grpo")  # [N]
        variances.append(gradient_variance(module, batch, advantages.cpu(), params))
        for name, value in group_signals(batch).items():
            per_signal[name].append(value)
        accuracies.append(batch.reward_components["math_accuracy"].nan_to_num(0.0).cpu())
    total_s = time.perf_counter() - start

    variance = torch.cat(variances).numpy()
    values = {name: torch.cat(parts).numpy() for name, parts in per_signal.items()}
    spread = values["rd"] > 0
    table = [
        "| signal | Spearman with V, all prompts | Spearman with V, prompts with RD > 0 "
        "| same, within equal-RD strata |",
        "|---|---|---|---|",
    ]
    results = {}
    strata = np.round(values["rd"][spread], 6)
    for offset, (name, label) in enumerate(SIGNAL_LABELS.items()):
        seed = args.seed + offset
        every = with_bootstrap_ci(spearman, (values[name], variance), args.resamples, seed)
        some = with_bootstrap_ci(spearman, (values[name][spread], variance[spread]), args.resamples, seed)
        within = with_bootstrap_ci(
            stratified_spearman, (values[name][spread], variance[spread], strata), args.resamples, seed
        )
        results[name] = (every, some, within)
        table.append(f"| {label} | {_fmt(*every)} | {_fmt(*some)} | {_fmt(*within)} |")
    accuracy = float(torch.cat(accuracies).mean())
    summary = (
        f"Policy: {policy.description}. {len(variance)} prompts "
        f"({'arithmetic task, validation split of seed ' + str(args.seed) if args.prompts is None else args.prompts})"
        f" x G = {args.group_size} completions at temperature {args.temperature}, up to {args.max_new_tokens} "
        f"tokens; sampled accuracy {accuracy:.3f}; {int(spread.sum())} prompts ({spread.mean():.0%}) have RD > 0. "
        f"V over {'all' if args.params is None else 'the ' + repr(args.params)} {num_params:,} parameters, GRPO "
        f"advantages (std-normalised, eps 1e-4); per-completion gradients summed over a group match one "
        f"batched backward to a relative {check:.1e}; values are Spearman rho [paired percentile-bootstrap 95% "
        f"CI, {args.resamples} resamples over prompts]. "
        f"Sampling + scoring {sample_s:.0f} s, total {total_s:.0f} s."
    )
    print(summary)
    print("\n".join(table))
    if args.params is None and args.prompts is None:
        scatter_plot(values, variance, FIGURES / "uncertainty_faithfulness.png")
    if not args.no_write:
        write_results_section(
            SECTION,
            [
                "## Uncertainty faithfulness (uncertainty_faithfulness.py)",
                "",
                run_header(),
                summary,
                "",
                *table,
                "",
                "Scatter plots (RD > 0 prompts): `benchmarks/figures/uncertainty_faithfulness.png`.",
                "",
                reading(results, spread),
            ],
        )


if __name__ == "__main__":
    main()
