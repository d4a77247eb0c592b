"""The statistics of benchmarks/compare_methods.py that the README's comparison reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from compare_methods import paired_bootstrap, sign_flip_p


def test_sign_flip_p_hand_values() -> None:
    # 5 differences of one sign: only the two all-same-sign patterns reach |mean| = 0.018, p = 2/32.
    assert sign_flip_p(np.array([0.01, 0.02, 0.03, 0.01, 0.02])) == pytest.approx(2 / 32)
    # |d| = (1, 2, 3, 1, 2) x 0.01 sum to 9 (odd), so no pattern has |sum| < 1 = the observed |sum|: p = 1.
    assert sign_flip_p(np.array([0.01, -0.02, 0.03, 0.01, -0.02])) == pytest.approx(1.0)
    # (3, 1, 1) x 0.01 observed sum 5: patterns with |sum| >= 5 are +++ and --- only: p = 2/8.
    assert sign_flip_p(np.array([0.03, 0.01, 0.01])) == pytest.approx(0.25)


def test_paired_bootstrap_interval() -> None:
    assert paired_bootstrap(np.full(5, 0.02)) == pytest.approx((0.02, 0.02))
    low, high = paired_bootstrap(np.array([-0.02, 0.0, 0.01, 0.03, 0.05]), resamples=4000)
    assert -0.02 < low < 0.014 < high < 0.05  # around the mean 0.014, inside the range of the data
