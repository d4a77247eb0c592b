"""Evaluation: benchmark loaders (normalised items) and metrics (torchmetrics)."""

from __future__ import annotations

from lit_gcpo.data.benchmarks import BENCHMARKS, BenchmarkItems, BenchmarkSpec, load_benchmark, normalise_rows
from lit_gcpo.evaluation.metrics import (
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

__all__ = [
    "BENCHMARKS",
    "QAF1",
    "AverageAtK",
    "BenchmarkItems",
    "BenchmarkSpec",
    "GreedyAccuracy",
    "IncorrectnessAUROC",
    "MajorityAtK",
    "PassAtK",
    "QAExactMatch",
    "load_benchmark",
    "majority_answer",
    "normalise_rows",
    "pass_at_k",
]
