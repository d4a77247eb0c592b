"""The diagnostics window: pooled groups, correlations with RD over the pool, and a state that round-trips."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from lit_gcpo.algorithms.diagnostics import CORRELATIONS, DiagnosticsWindow, correlation_or_zero
from lit_gcpo.algorithms.embeddings import SentenceEncoder


def test_window_pools_steps_and_its_state_round_trips() -> None:
    window = DiagnosticsWindow()
    window.add({"rd": torch.tensor([0.0, 0.5, 1.0]), "bot": torch.tensor([0.3, 0.1, 0.2])})
    window.add({"rd": torch.tensor([0.25, 0.75]), "bot": torch.tensor([0.9, 0.4])})
    assert len(window) == 5
    restored = DiagnosticsWindow()
    restored.load_state_dict(window.state_dict())
    rd, bot = [0.0, 0.5, 1.0, 0.25, 0.75], [0.3, 0.1, 0.2, 0.9, 0.4]
    correlations = restored.correlations(prefix="c/")
    assert set(correlations) == {"c/bot_pearson", "c/bot_spearman"}
    assert float(correlations["c/bot_spearman"]) == pytest.approx(spearmanr(bot, rd).statistic, abs=1e-6)
    assert float(correlations["c/bot_pearson"]) == pytest.approx(pearsonr(bot, rd).statistic, abs=1e-6)
    assert len(restored) == 0 and restored.correlations() == {}
    with pytest.raises(KeyError, match="'rd'"):
        window.add({"bot": torch.tensor([0.1])})
    with pytest.raises(ValueError, match="differ"):
        window.add({"rd": torch.tensor([0.1]), "cd": torch.tensor([0.1])})
    # undefined correlations are 0, so that every diagnostics step logs the same keys
    assert float(correlation_or_zero(CORRELATIONS["spearman"], torch.ones(4), torch.arange(4.0))) == 0.0
    assert float(correlation_or_zero(CORRELATIONS["spearman"], torch.arange(2.0), torch.arange(2.0))) == 0.0


def test_sentence_encoder_checks_its_input() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SentenceEncoder(batch_size=0)
    with pytest.raises(TypeError, match="text 1 is a NoneType"):
        SentenceEncoder().encode(["fine", None])  # type: ignore[list-item]
