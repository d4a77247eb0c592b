"""The command line of a ``lit-gcpo test`` run on local benchmark files, shared by the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
REWARD = "lit_gcpo.evaluation.grading:benchmark_correctness"


def source(name: str, path: str | Path, **settings: Any) -> dict[str, Any]:
    """A ``BenchmarkSource`` entry of ``data.test``."""
    return {
        "class_path": "lit_gcpo.evaluation.sources.BenchmarkSource",
        "init_args": {"name": name, "path": str(path), **settings},
    }


def cli_test_args(
    model_dir: str,
    out: Path,
    sources: list[dict[str, Any]],
    *,
    samples: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
) -> list[str]:
    """``lit-gcpo test`` arguments: the tiny model on CPU, BenchmarkReport writing to ``out``, no logger."""
    return [
        "test",
        "--model.model",
        model_dir,
        f"--data.test={json.dumps(sources)}",
        f"--data.rewards=[{REWARD}]",
        f"--data.accuracy_reward={REWARD}",
        f"--data.val_samples={samples}",
        f"--data.val_temperature={temperature}",
        f"--data.sampling.max_new_tokens={max_new_tokens}",
        f"--data.val_batch_size={batch_size}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=false",
        "--trainer.callbacks+=lit_gcpo.evaluation.callback.BenchmarkReport",
        f"--trainer.callbacks.output_dir={out}",
    ]
