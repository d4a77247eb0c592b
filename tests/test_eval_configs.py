"""The evaluation configs parse, and ask for what their comments say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_gcpo.evaluation import BENCHMARKS
from lit_gcpo.running.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def _parsed(name: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _benchmarks(config: dict) -> dict[str, dict]:
    return {entry["init_args"]["name"]: entry["init_args"] for entry in config["data"]["test"]}


def _report(config: dict) -> dict:
    (report,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("BenchmarkReport")]
    return report["init_args"]


def test_eval_qa_config_has_the_three_qa_benchmarks_greedy_and_sampled(capsys) -> None:
    config = _parsed("eval_qa.yaml", capsys)
    benchmarks = _benchmarks(config)
    assert list(benchmarks) == ["hotpotqa", "narrativeqa", "qasper"]
    for settings in benchmarks.values():
        assert settings["greedy"] is True and settings["max_context_tokens"] == 3000 and settings["path"] is None
    data = config["data"]
    assert (data["val_samples"], data["val_temperature"], data["sampling"]["max_new_tokens"]) == (8, 0.6, 64)
    assert data["rewards"] == ["qa_f1"]
    assert _report(config)["averages"] == {"qa": ["hotpotqa", "narrativeqa", "qasper"]}
    assert _report(config)["output_dir"] == "runs/eval_qa"  # fixed: a restarted run resumes


def test_eval_math_config_asks_for_greedy_and_more_samples_on_aime_and_amc(capsys) -> None:
    benchmarks = _benchmarks(_parsed("eval_math.yaml", capsys))
    assert list(benchmarks) == ["math500", "aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k"]
    assert all(settings["greedy"] for settings in benchmarks.values())
    assert {name: settings["samples"] for name, settings in benchmarks.items()} == {
        "math500": None,
        "aime24": 32,
        "amc23": 32,
        "minerva_math": None,
        "olympiadbench": None,
        "gsm8k": None,
    }


def test_eval_samples_config_covers_every_benchmark_with_its_sample_file(capsys) -> None:
    config = _parsed("eval_samples.yaml", capsys)
    benchmarks = _benchmarks(config)
    assert sorted(benchmarks) == sorted(BENCHMARKS.names())
    root = Path(__file__).parents[1]
    for settings in benchmarks.values():
        assert (root / settings["path"]).is_file() and settings["greedy"] is True
    assert set(_report(config)["averages"]["math"]) | set(_report(config)["averages"]["qa"]) == set(benchmarks)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("eval_*.yaml")))
def test_every_eval_config_writes_to_a_fixed_output_dir_so_a_restart_resumes(name, capsys) -> None:
    """Without one the reports went into each run's new version_N: a killed evaluation restarted from scratch."""
    config = _parsed(name, capsys)
    assert _report(config)["output_dir"] == config["trainer"]["default_root_dir"]


@pytest.mark.parametrize("name", ["eval_math.yaml", "eval_samples.yaml"])
def test_math_eval_configs_state_the_answer_fallback_and_the_harness_setting(name: str, capsys) -> None:
    assert _report(_parsed(name, capsys))["answer_fallback"] == "none"  # the default, stated
    text = (CONFIGS / name).read_text()
    assert "last_number = the Qwen2.5-Math evaluation harness's setting" in text
