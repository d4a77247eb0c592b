"""Per-prompt uncertainty signals of evaluation completions (METHODS.md §3-4), for calibration AUROCs.

The signals are the training ones of ``lit_gcpo.algorithms.uncertainty.uncertainty_signals``, computed on the k
evaluation completions of each prompt:

* ``se`` / ``se_n``: semantic entropy over answer clusters (``lit_gcpo.algorithms.clustering.answer_clusters``)
  under the benchmark kind's equivalence (Math-Verify for math, equal SQuAD-normalised text for QA; a comparison
  Math-Verify gives no verdict on counts as not equivalent and is reported with its completions);
  Rao (likelihood-weighted) when the batch has the policy's log-probs, else discrete (counts);
* ``cd`` / ``bot``: cosine dispersion and barycentric transport of ``batch.embeddings``;
* ``rd`` / ``u_c``: reward dispersion of ``batch.rewards`` and the calibrated ``U (1 - RD)``.

Project's readings: a prompt with fewer than two completions has no uncertainty estimate (every signal
NaN, so it drops out of the AUROCs instead of entering as a tie at 0); a prompt none of whose rewards is
finite has NaN ``rd`` and ``u_c``. ``u_c`` uses the rewards, which read the gold: it measures how much
of the geometric signal the rewards leave unexplained (GCPO's calibration), not a gold-free detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_gcpo.algorithms.clustering import MissingVerdicts, NoVerdict, answer_clusters
from lit_gcpo.algorithms.uncertainty import group_sizes, uncertainty_signals
from lit_gcpo.evaluation.grading import equivalence

AUROC_SIGNALS = ("se", "cd", "bot", "u_c")
"""The signals whose AUROC (predicting an incorrect majority answer) is reported."""

_REWARD_SIGNALS = ("rd", "u_c")


def kind_answer_clusters(
    answers: Sequence[str | None],
    group_ids: Tensor,
    group_kinds: Sequence[str],
    on_no_verdict: NoVerdict | None = None,
) -> Tensor:
    """``[N]`` local answer-cluster ids, each group clustered under its benchmark kind's equivalence.

    Args:
        answers: ``[N]`` extracted answers (None = no answer, a singleton).
        group_ids: ``[N]`` group of each completion.
        group_kinds: ``[B]`` ``math`` or ``qa`` for each group.
        on_no_verdict: called for each comparison Math-Verify gave no verdict on (not equivalent) with the positions
            in ``answers`` of the completion being placed and of its cluster's first member, and why; None: one
            warning naming them.
    """
    cluster_ids = torch.zeros(group_ids.numel(), dtype=torch.long)  # [N]
    groups = group_ids.detach().cpu().long()  # [N]
    warned = MissingVerdicts(groups.tolist())  # the default: one warning
    report = on_no_verdict if on_no_verdict is not None else warned
    for kind in sorted(set(group_kinds)):
        in_kind = torch.tensor([group_kinds[g] == kind for g in groups.tolist()], dtype=torch.bool)  # [N]
        positions = torch.nonzero(in_kind).flatten().tolist()  # [M]
        if not positions:
            continue

        def in_batch(position: int, other: int, why: str, positions: list[int] = positions) -> None:
            report(positions[position], positions[other], why)  # the subset's positions are the batch's

        subset = [answers[i] for i in positions]
        cluster_ids[positions] = answer_clusters(subset, groups[positions], equivalence(kind), in_batch)
    if on_no_verdict is None:
        warned.warn()
    return cluster_ids.to(group_ids.device)


def prompt_signals(
    group_ids: Tensor,
    answers: Sequence[str | None],
    group_kinds: Sequence[str],
    *,
    rewards: Tensor,
    embeddings: Tensor | None = None,
    seq_logprobs: Tensor | None = None,
    geometric: str = "bot",
    reward_range: tuple[float, float] = (0.0, 1.0),
    on_no_verdict: NoVerdict | None = None,
) -> dict[str, Tensor]:
    """Every uncertainty signal the inputs allow, ``[B]`` float32 each on the CPU (NaN: undefined).

    Args:
        group_ids: ``[N]`` prompt of each completion, values in ``[0, B)`` with ``B = len(group_kinds)``.
        answers: ``[N]`` extracted answers.
        group_kinds: ``[B]`` benchmark kind of each prompt.
        rewards: ``[N]`` rewards (NaN = no score), the input of ``rd`` and ``u_c``.
        embeddings: ``[N, d]`` one vector per completion, or None (no ``cd``/``bot``/``u_c``).
        seq_logprobs: ``[N]`` length-normalised log-likelihoods (Rao SE), or None (discrete SE).
        geometric: ``bot`` or ``cd``, the U of ``u_c``.
        reward_range: ``(min, max)`` possible reward, the scale of ``rd``.
        on_no_verdict: the answer clustering's comparisons without a verdict (``kind_answer_clusters``).
    """
    num_groups = len(group_kinds)
    group_ids = group_ids.detach().cpu().long()  # [N]
    cluster_ids = kind_answer_clusters(answers, group_ids, group_kinds, on_no_verdict)  # [N]
    signals, _ = uncertainty_signals(
        group_ids,
        num_groups,
        rewards=rewards.detach().cpu().float(),
        cluster_ids=cluster_ids,
        embeddings=None if embeddings is None else embeddings.detach().cpu().float(),
        seq_logprobs=None if seq_logprobs is None else seq_logprobs.detach().cpu().float(),
        se_kind="rao" if seq_logprobs is not None else "discrete",
        reward_range=reward_range,
        geometric=geometric,
    )
    single = group_sizes(group_ids, num_groups) < 2  # [B]
    finite = torch.zeros(num_groups).index_add_(0, group_ids, torch.isfinite(rewards.detach().cpu()).float())
    no_reward = finite == 0  # [B]
    out: dict[str, Tensor] = {}
    for name, value in signals.items():
        value = value.detach().cpu().float().clone()  # [B]
        if name != "num_clusters":
            value[single] = float("nan")
        if name in _REWARD_SIGNALS:
            value[no_reward] = float("nan")
        out[name] = value
    return out
