"""Evaluation metrics as torchmetrics ``Metric``s (summed states, so they reduce across ranks).

* ``GreedyAccuracy``: mean correctness of one (greedy) completion per problem.
* ``AverageAtK``: avg@k, mean correctness of the first k sampled completions per problem, averaged.
* ``PassAtK``: the unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", eq. 1), ``1 - C(n-c, k) / C(n, k)`` for c correct of n samples, computed in their
  numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
* ``MajorityAtK``: maj@k, the answer most of the first k completions agree on (under an equivalence
  function, Math-Verify's by default) compared with the gold; comparisons without a verdict are counted
  (``no_verdict``) and warned about.
* ``QAExactMatch`` / ``QAF1``: SQuAD-style EM / token F1, max over references (``lit_gcpo.rewards.qa``).
* ``IncorrectnessAUROC``: how well an uncertainty score ranks incorrect answers above correct ones
  (torchmetrics' binary AUROC, positive class = incorrect).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from lit_gcpo.algorithms.clustering import COMPARED, Equivalence, NoVerdict, verdict_of
from lit_gcpo.rewards.answers import compare_answers, report_missing_verdicts
from lit_gcpo.rewards.qa import exact_match, token_f1


class _MeanOverProblems(Metric):
    """A per-problem score summed over problems (``total``) with the problem count (``count``)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, per_problem: torch.Tensor) -> None:
        self.total += per_problem.to(torch.float64).sum()
        self.count += per_problem.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count


def _as_matrix(correct: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if correct.ndim != 2:
        raise ValueError(f"{name}: correct must be [problems, samples], got shape {tuple(correct.shape)}")
    if correct.shape[1] < k:
        raise ValueError(f"{name}: needs at least k={k} samples per problem, got {correct.shape[1]}")
    return correct.to(torch.float64)


class GreedyAccuracy(_MeanOverProblems):
    """Fraction of problems whose single (greedy) completion is correct."""

    def update(self, correct: torch.Tensor) -> None:
        """``correct``: ``[B]`` bool/0-1, one completion per problem."""
        self._add(correct.reshape(-1).to(torch.float64))  # [B]


class _AtK(_MeanOverProblems):
    """A mean over problems of a score computed from ``k`` samples per problem."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k


class AverageAtK(_AtK):
    """avg@k: mean over problems of the mean correctness of the first ``k`` samples."""

    def update(self, correct: torch.Tensor) -> None:
        """``correct``: ``[B, n]`` bool/0-1 with ``n >= k``; samples beyond the first k are ignored."""
        matrix = _as_matrix(correct, self.k, "avg@k")  # [B, n]
        self._add(matrix[:, : self.k].mean(dim=1))  # [B]


def pass_at_k(num_samples: torch.Tensor, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k per problem, ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (1 when ``n - c < k``).

    Args:
        num_samples: ``[B]`` n, samples per problem (each >= k).
        num_correct: ``[B]`` c, correct samples per problem.
    """
    n = num_samples.to(torch.float64)  # [B]
    c = num_correct.to(torch.float64)  # [B]
    if bool((n < k).any()):
        raise ValueError(f"pass@k needs n >= k={k} samples for every problem, got min n={int(n.min())}")
    width = int(n.max().item()) if n.numel() else 0
    i = torch.arange(1, width + 1, dtype=torch.float64)  # [W], i = 1..max n
    in_product = (i[None, :] > (n - c)[:, None]) & (i[None, :] <= n[:, None])  # [B, W]
    factors = torch.where(in_product, 1.0 - k / i[None, :], torch.ones_like(in_product, dtype=torch.float64))
    estimate = 1.0 - factors.prod(dim=1)  # [B]
    return torch.where(n - c < k, torch.ones_like(estimate), estimate)  # [B]


class PassAtK(_AtK):
    """Unbiased pass@k (Chen et al. 2021, eq. 1) from all n samples of each problem."""

    def update(self, correct: torch.Tensor) -> None:
        """``correct``: ``[B, n]`` bool/0-1 with ``n >= k``."""
        matrix = _as_matrix(correct, self.k, "pass@k")  # [B, n]
        n = torch.full((matrix.shape[0],), matrix.shape[1], dtype=torch.float64)  # [B]
        self._add(pass_at_k(n, matrix.sum(dim=1), self.k))  # [B]


def majority_answer(
    answers: Sequence[str | None], equivalent: Equivalence, on_no_verdict: NoVerdict | None = None
) -> str | None:
    """The answer of the largest class of equivalent answers (None and blank answers ignored: an empty
    ``\\boxed{}`` is no answer and cannot win the vote).

    An answer joins the first class whose first member it is equivalent to; ties between classes go to
    the class whose first member came first. ``equivalent`` returns a bool or a ``Verdict``: a comparison without
    a verdict counts as not equivalent and is reported to ``on_no_verdict(position, first member's position,
    why)``, or in one warning when that is None (``lit_gcpo.algorithms.clustering.NoVerdict``).
    """
    classes: list[list[int]] = []  # positions of each class's members, the first one first
    problems: list[str] = []
    for position, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        for members in classes:
            equal, problem = verdict_of(equivalent(answers[members[0]], answer))
            if problem is not None and on_no_verdict is not None:
                on_no_verdict(position, members[0], problem)
            elif problem is not None:
                problems.append(f"answer {position} against {members[0]}: {problem}")
            if equal:
                members.append(position)
                break
        else:
            classes.append([position])
    report_missing_verdicts("majority vote", problems, len(answers), outcome=COMPARED)
    if not classes:
        return None
    return answers[max(classes, key=len)[0]]  # max keeps the first of equal sizes


class MajorityAtK(_AtK):
    """maj@k: the majority answer of the first ``k`` completions, graded against the gold.

    A comparison without a verdict (the equivalence returns a ``Verdict`` with a ``problem``: Math-Verify timed out,
    raised or its process died) counts as not equivalent, as in ``majority_answer`` and the rewards; ``no_verdict``
    counts them (a summed state), and each ``update`` names them in one warning.

    Args:
        k: completions voting per problem.
        equivalent: ``(a, b) ->`` a bool or a ``Verdict``, by default ``lit_gcpo.rewards.answers.compare_answers``;
            used both to group the answers and to compare the majority with the gold (gold first).
    """

    def __init__(self, k: int, equivalent: Equivalence = compare_answers, **kwargs) -> None:
        super().__init__(k, **kwargs)
        self.equivalent = equivalent
        self.add_state("no_verdict", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str | None]], golds: Sequence[str]) -> None:
        """``answers[b]``: the extracted answers of problem b (None = no answer); ``golds[b]``: its gold."""
        if len(answers) != len(golds):
            raise ValueError(f"maj@k: {len(answers)} answer lists for {len(golds)} golds")
        scores, missing = [], []
        for b, (problem, gold) in enumerate(zip(answers, golds, strict=True)):
            if len(problem) < self.k:
                raise ValueError(f"maj@k: needs at least k={self.k} answers per problem, got {len(problem)}")

            def vote_failed(position: int, other: int, why: str, b: int = b) -> None:
                missing.append(f"problem {b}, answer {position} against {other}: {why}")

            winner = majority_answer(list(problem)[: self.k], self.equivalent, vote_failed)
            correct, why = verdict_of(self.equivalent(gold, winner)) if winner is not None else (False, None)
            if why is not None:
                missing.append(f"problem {b}, the majority answer against the gold: {why}")
            scores.append(float(correct))
        self.no_verdict += len(missing)
        report_missing_verdicts(f"maj@{self.k}", missing, len(answers) * self.k, outcome=COMPARED)
        self._add(torch.tensor(scores, dtype=torch.float64))  # [B]


class _QAMetric(_MeanOverProblems):
    _score: Callable[[str, str], float]

    def update(self, predictions: Sequence[str | None], references: Sequence[str | Sequence[str]]) -> None:
        """``predictions[b]``: the predicted answer text, None when no answer was found (scores 0, even against a
        reference that normalises to nothing, such as "')."); ``references[b]``: one or several references."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
        scores = []
        for prediction, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else list(refs)
            found = prediction is not None
            scores.append(max((type(self)._score(prediction, r) for r in refs if found), default=0.0))
        self._add(torch.tensor(scores, dtype=torch.float64))  # [B]


class QAExactMatch(_QAMetric):
    """SQuAD exact match after normalisation, max over references."""

    _score = staticmethod(exact_match)


class QAF1(_QAMetric):
    """SQuAD token F1 after normalisation, max over references."""

    _score = staticmethod(token_f1)


class IncorrectnessAUROC(Metric):
    """AUROC of an uncertainty score as a detector of incorrect answers (positive class = incorrect).

    Scores of any range are accepted: at ``compute`` they are replaced by their dense ranks scaled to
    [0, 1] (ties keep equal ranks) before torchmetrics' ``binary_auroc``, which would otherwise squash
    scores outside [0, 1] through a sigmoid and turn large distinct scores into ties. AUROC depends only
    on the order, so the value is unchanged. NaN when only one class is present.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("incorrect", default=[], dist_reduce_fx="cat")

    def update(self, uncertainty: torch.Tensor, correct: torch.Tensor) -> None:
        """``uncertainty``: ``[B]`` higher = less sure (NaN rows are ignored); ``correct``: ``[B]`` bool/0-1."""
        if uncertainty.shape != correct.shape:
            raise ValueError(f"uncertainty {tuple(uncertainty.shape)} and correct {tuple(correct.shape)} differ")
        scores = uncertainty.reshape(-1).to(torch.float64)  # [B]
        keep = ~torch.isnan(scores)  # [B]
        self.scores.append(scores[keep])
        self.incorrect.append((correct.reshape(-1)[keep].to(torch.float64) < 0.5).long())

    def compute(self) -> torch.Tensor:
        # after a data-parallel sync the states are already concatenated tensors, not lists
        if isinstance(self.scores, list) and not self.scores:
            return torch.tensor(float("nan"))
        scores = dim_zero_cat(self.scores)  # [M]
        incorrect = dim_zero_cat(self.incorrect)  # [M]
        if incorrect.numel() == 0 or incorrect.min() == incorrect.max():
            return torch.tensor(float("nan"))
        distinct, rank = torch.unique(scores, sorted=True, return_inverse=True)  # rank: [M]
        preds = rank.to(torch.float32) / max(distinct.numel() - 1, 1)  # [M], in [0, 1]
        return binary_auroc(preds, incorrect, thresholds=None)
