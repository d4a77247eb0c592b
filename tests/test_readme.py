"""The README's callback example runs as written and hands its module the callback's weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_callback_example_runs_and_weights_reach_the_module(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "UncertaintyCallback" in b and "L.Trainer" in b)
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)  # our own documentation, not model output
    trainer = namespace["trainer"]
    metrics = trainer.callback_metrics
    # 'answers' gives clusters {1,1}, {2}, {None}; gcpo's default weights 1 / (1 + u) are normalised to mean 1
    # over the groups with reward spread (METHODS.md 5.1), so some group is damped below 1 and some lifted above
    assert float(metrics["uncertainty/weight_spread_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["uncertainty/weight_spread_min"]) < 1.0 < float(metrics["uncertainty/weight_spread_max"])
    assert float(metrics["uncertainty/num_clusters_mean"]) == 3.0
    assert "uncertainty/weight_mean" in capsys.readouterr().out
