"""Evaluation metrics against hand-computed values and plain-loop references."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from lit_gcpo.evaluation import (
    QAF1,
    AverageAtK,
    GreedyAccuracy,
    IncorrectnessAUROC,
    MajorityAtK,
    PassAtK,
    QAExactMatch,
    majority_answer,
    pass_at_k,
)


def test_greedy_accuracy_over_batches() -> None:
    metric = GreedyAccuracy()
    metric.update(torch.tensor([True, False, True]))
    metric.update(torch.tensor([0.0, 0.0]))
    assert metric.compute().item() == pytest.approx(2 / 5, abs=1e-15)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(GreedyAccuracy().compute().item())


def test_average_at_k_by_hand() -> None:
    correct = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]])
    at2, at4 = AverageAtK(2), AverageAtK(4)
    at2.update(correct)
    at4.update(correct)
    assert at2.compute().item() == pytest.approx((0.5 + 0.0) / 2, abs=1e-15)  # first two samples only
    assert at4.compute().item() == pytest.approx((0.75 + 0.25) / 2, abs=1e-15)
    with pytest.raises(ValueError, match="at least k=5"):
        AverageAtK(5).update(correct)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10; product form 1 - (1 - 2/4)(1 - 2/5) = 1 - 0.3
        (5, 2, 4, 1.0),  # n - c = 3 < k: every 4-subset holds a correct sample
        (5, 0, 3, 0.0),
        (4, 4, 4, 1.0),
    ],
)
def test_pass_at_k_by_hand(n: int, c: int, k: int, expected: float) -> None:
    value = pass_at_k(torch.tensor([n]), torch.tensor([c]), k)
    assert value.item() == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_matches_exact_binomials_including_large_n() -> None:
    rng = random.Random(0)
    cases = [(rng.randint(1, 40), 0, 0) for _ in range(200)]
    cases = [(n, rng.randint(0, n), rng.randint(1, n)) for n, _, _ in cases] + [(200, 3, 100), (1000, 7, 500)]
    for n, c, k in cases:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # C(n-c, k) = 0 when n - c < k
        value = pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item()
        assert value == pytest.approx(float(exact), rel=1e-12, abs=1e-14), (n, c, k)


def test_pass_at_k_metric_and_merged_states() -> None:
    correct = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    whole = PassAtK(2)
    whole.update(correct)
    # problem 1: n=5, c=2 -> 0.7; problem 2: 0; problem 3: 1 -> mean 1.7 / 3
    assert whole.compute().item() == pytest.approx(1.7 / 3, abs=1e-15)
    first, second = PassAtK(2), PassAtK(2)
    first.update(correct[:1])
    second.update(correct[1:])
    first.merge_state(second)  # what the cross-rank "sum" reduction does
    assert first.compute().item() == pytest.approx(1.7 / 3, abs=1e-15)


def _numeric_equal(a: str, b: str) -> bool:
    return float(a) == float(b)


def test_majority_answer_classes_and_ties() -> None:
    assert majority_answer(["1", "2", "2.0", "3"], _numeric_equal) == "2"
    assert majority_answer(["6", "5", "5.0", "6.0"], _numeric_equal) == "6"  # tie: first class wins
    assert majority_answer([None, "4", None], _numeric_equal) == "4"
    assert majority_answer([None, None], _numeric_equal) is None


def test_majority_at_k_by_hand() -> None:
    answers = [["1", "2", "2.0", "3"], ["5", "6", "6", "5"], [None, None, None, None]]
    golds = ["2", "5", "1"]
    maj4, maj1 = MajorityAtK(4, _numeric_equal), MajorityAtK(1, _numeric_equal)
    maj4.update(answers, golds)
    maj1.update(answers, golds)
    # maj@4: "2" right, tie 5/6 -> "5" right, no answer -> wrong: 2/3
    assert maj4.compute().item() == pytest.approx(2 / 3, abs=1e-15)
    # maj@1: "1" wrong, "5" right, None wrong: 1/3
    assert maj1.compute().item() == pytest.approx(1 / 3, abs=1e-15)


def test_majority_at_k_with_math_verify() -> None:
    metric = MajorityAtK(3)
    metric.update([["\\frac12", "0.4", "0.5"], ["3", "\\frac{6}{2}", "4"]], ["1/2", "4"])
    # problem 1: {1/2, 0.5} beats {0.4} and equals the gold; problem 2: {3, 6/2} wins but the gold is 4
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-15)


def test_majority_at_k_counts_comparisons_without_a_verdict_and_keeps_its_verdicts(caplog) -> None:
    """An equivalence that answers ``Verdict(False, why)`` for the pair {x, y} (a Math-Verify timeout), else
    case-insensitive equality."""
    from lit_gcpo.rewards.answers import Verdict

    def stub(a: str, b: str) -> Verdict:
        return Verdict(False, "timed out (stub)") if {a, b} == {"x", "y"} else Verdict(a.upper() == b.upper())

    answers, golds = [["x", "y", "Y", "X", "X"]] * 2, ["x", "y"]
    metric = MajorityAtK(5, stub)
    with caplog.at_level("WARNING", logger="lit_gcpo.rewards.answers"):
        metric.update(answers, golds)
    # each problem's vote: y against x has no verdict (1), a class of its own; Y joins y; X, X join x: x wins 3 to 2.
    # problem 0: x against the gold x, right. problem 1: the gold y against x has no verdict (1 more): wrong. 1/2
    assert metric.compute().item() == 0.5 and int(metric.no_verdict) == 3
    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("maj@5")]
    assert warning.startswith("maj@5: no Math-Verify verdict for 3 comparisons of 10 completions")
    assert "problem 1, the majority answer against the gold: timed out (stub)" in warning
    plain = MajorityAtK(5, lambda a, b: stub(a, b).equal)  # the same verdicts as a bool: the same maj@5, no count
    plain.update(answers, golds)
    assert plain.compute().item() == 0.5 and int(plain.no_verdict) == 0
    metric.reset()
    assert int(metric.no_verdict) == 0


def test_qa_metrics_by_hand() -> None:
    predictions = ["The Servant of Wanda", "pittsburgh", "a big red dog"]
    references = [["Servant", "Wanda's Servant"], "Pittsburgh.", ["the red dog barked"]]
    em, f1 = QAExactMatch(), QAF1()
    em.update(predictions, references)
    f1.update(predictions, references)
    assert em.compute().item() == pytest.approx(1 / 3, abs=1e-15)
    # F1: 1/2 ("servant of wanda" vs "servant"), 1, 2/3 ("big red dog" vs "red dog barked")
    assert f1.compute().item() == pytest.approx((0.5 + 1 + 2 / 3) / 3, abs=1e-15)


def test_no_answer_matches_nothing_even_a_reference_that_normalises_to_nothing() -> None:
    """SQuAD normalisation turns "')." into "", which "" (and a missing answer read as "") would match exactly."""
    em, f1 = QAExactMatch(), QAF1()
    em.update(
        [None, ")", "x"],
        [
            "').",
            "').",
            "').",
        ],
    )
    f1.update([None], ["x"])
    assert em.compute().item() == pytest.approx(1 / 3, abs=1e-15)  # only the answer ")" equals it
    assert f1.compute().item() == 0.0


@pytest.mark.parametrize(
    ("uncertainty", "correct", "expected"),
    [
        # incorrect scores {0.35, 0.8} vs correct {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75
        ([0.1, 0.4, 0.35, 0.8], [1, 1, 0, 0], 0.75),
        # incorrect {1, 3} vs correct {0, 1}: 1>0, 1=1 (half), 3>0, 3>1 -> 3.5 / 4
        ([0.0, 1.0, 1.0, 3.0], [1, 1, 0, 0], 0.875),
        # scores far outside [0, 1] (a sigmoid would make them all 1.0 and give 0.5)
        ([100.0, 200.0, 300.0, 400.0], [1, 1, 0, 0], 1.0),
        ([70.0, -50.0, -60.0], [0, 1, 1], 1.0),  # the most uncertain answer is the only incorrect one
        ([5.0, 1.0, 3.0], [1, 0, 0], 0.0),
    ],
)
def test_incorrectness_auroc_by_hand(uncertainty: list[float], correct: list[int], expected: float) -> None:
    metric = IncorrectnessAUROC()
    metric.update(torch.tensor(uncertainty), torch.tensor(correct))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_incorrectness_auroc_matches_pairwise_loop_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=gen).double() * 37.5  # many ties, large values
    correct = torch.rand(60, generator=gen) < 0.5
    metric = IncorrectnessAUROC()
    for chunk in range(3):
        metric.update(scores[chunk * 20 : (chunk + 1) * 20], correct[chunk * 20 : (chunk + 1) * 20])
    positives = [s for s, ok in zip(scores.tolist(), correct.tolist(), strict=True) if not ok]
    negatives = [s for s, ok in zip(scores.tolist(), correct.tolist(), strict=True) if ok]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(positives, negatives))
    assert metric.compute().item() == pytest.approx(wins / (len(positives) * len(negatives)), abs=1e-6)


def test_incorrectness_auroc_one_class_and_nan_scores() -> None:
    metric = IncorrectnessAUROC()
    metric.update(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))
    assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([float("nan"), 0.5]), torch.tensor([0, 0]))
    # the NaN row is dropped: incorrect {0.5} vs correct {0.2, 0.9} -> 1 of 2 pairs
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-6)


def test_incorrectness_auroc_after_a_data_parallel_sync() -> None:
    """A sync replaces the list states by concatenated tensors (dist_reduce_fx="cat"); compute must accept that."""
    metric = IncorrectnessAUROC()
    metric.update(torch.tensor([0.0, 1.0]), torch.tensor([1, 1]))
    metric.update(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]))
    expected = metric.compute().item()  # 0.875, as in the hand-derived case above
    metric.scores, metric.incorrect = torch.cat(metric.scores), torch.cat(metric.incorrect)  # what a sync leaves
    assert metric.compute().item() == pytest.approx(expected, abs=1e-9) == pytest.approx(0.875)
