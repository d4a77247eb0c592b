"""The README's callback example runs as written and hands its module the callback's weights."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_callback_example_runs_and_weights_reach_the_module(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "UncertaintyCallback" in b and "L.Trainer" in b)
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)  # our own documentation, not model output
    trainer = namespace["trainer"]
    metrics = trainer.callback_metrics
    # 'answers' gives clusters {1,1}, {2}, {None}: gcpo's weights exp(-BoT (1 - RD)) lie in [e^-1, 1], and a
    # group whose rewards do not explain its disagreement (RD < 1) is damped below 1
    assert 0.3679 < float(metrics["uncertainty/weight_min"]) < 1.0
    assert float(metrics["uncertainty/weight_max"]) <= 1.0
    assert float(metrics["uncertainty/num_clusters_mean"]) == 3.0
    assert "uncertainty/weight_mean" in capsys.readouterr().out
