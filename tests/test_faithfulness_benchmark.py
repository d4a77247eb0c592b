"""benchmarks/uncertainty_faithfulness.py end to end on a few prompts: the label-free methods' signals are computed
from the scoring pass and correlated with V beside SE, CD, BoT and U_c."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import faithfulness_diagnosis as diagnostic
import uncertainty_faithfulness as script
from faithfulness_testbeds import legacy_setting

from lit_gcpo.algorithms.label_free import label_free_signals


def test_the_diagnostic_reports_the_label_free_signals(monkeypatch) -> None:
    captured = []
    original = diagnostic.batch_signals
    monkeypatch.setattr(
        diagnostic, "batch_signals", lambda batch, *rest: captured.append(batch) or original(batch, *rest)
    )
    args = argparse.Namespace(
        device="cpu", prompts=None, num_prompts=12, seed=0, temperature=1.0, max_new_tokens=8, group_size=4, chunk=12,
        params=r"layers\.1\.", resamples=50,
    )  # fmt: skip
    torch.manual_seed(0)
    setting = legacy_setting("arithmetic", None, args.num_prompts, args.seed)
    result = diagnostic.diagnose("lit-gcpo/tiny-arith", args, setting)
    names = ("majority", "cluster_share", "self_certainty", "token_entropy")
    assert all(name in result.results for name in names) and "token_entropy - se" in result.differences
    rows = "\n".join(script.table(result))
    assert all(diagnostic.SIGNAL_LABELS[name] in rows for name in names)
    # the signals correlated are the label-free ones of the sampled batch, from its token summaries
    (batch,) = captured
    assert batch.token_entropy is not None and batch.token_mean_logprob is not None
    answered = torch.tensor([a not in (None, "") for a in batch.answers])
    from lit_gcpo.algorithms.clustering import answer_clusters

    expected = label_free_signals(
        answer_clusters(batch.answers, batch.group_ids), batch.group_ids, batch.num_groups, answered,
        token_entropy=batch.token_entropy, token_mean_logprob=batch.token_mean_logprob, mask=batch.completion_mask,
        vocab_size=batch.vocab_size,
    )  # fmt: skip
    signals = original(batch, setting)
    for name in names:
        torch.testing.assert_close(signals[name], expected[name].double().cpu())
    assert float(np.ptp(signals["token_entropy"].numpy())) > 0  # prompts differ: there is something to correlate
