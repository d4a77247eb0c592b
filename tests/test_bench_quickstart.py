"""benchmarks/bench_quickstart.py reads a run's TensorBoard scalars into the README's per-seed table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_quickstart import latest_version, summarise, table


def _fake_run(log_dir: Path, validations: dict[int, float], truncated: list[float], step_s: float = 0.5) -> None:
    """A run's event file: ``val/accuracy`` at the given steps and one ``truncated_frac`` per training step,
    the training steps ``step_s`` apart in wall time except one 30 s gap (a validation)."""
    writer = SummaryWriter(str(log_dir))
    wall = 1_000.0
    for step, value in enumerate(truncated):
        wall += 30.0 if step == 10 else step_s
        writer.add_scalar("completion/truncated_frac", value, step, walltime=wall)
    for step, value in validations.items():
        writer.add_scalar("val/accuracy", value, step, walltime=wall)
    writer.close()


def test_summary_of_a_hand_made_run(tmp_path: Path) -> None:
    # 30 steps: truncated 0.5 for the first 10, then 0.1; the last 20 are all 0.1, the max is 0.5.
    _fake_run(tmp_path / "gcpo" / "version_0", {0: 0.25, 49: 0.5, 99: 0.4}, [0.5] * 10 + [0.1] * 20)
    run = summarise(latest_version(tmp_path))
    # logged at TensorBoard steps 49 and 99, i.e. after 50 and 100 training steps
    assert run.validations == [(0, 0.25), (50, 0.5), (100, pytest.approx(0.4))]
    assert (run.baseline, run.best) == (0.25, 0.5)
    assert run.final == pytest.approx(0.4)
    assert run.gain_points == pytest.approx(15.0)  # 100 x (0.40 - 0.25)
    assert run.truncated_tail == pytest.approx(0.1)
    assert run.truncated_max == pytest.approx(0.5)
    assert run.steps == 30
    assert run.step_s == pytest.approx(0.5)  # 28 gaps of 0.5 s and one of 30 s: the median ignores the validation


def test_latest_version_is_by_number_not_by_name(tmp_path: Path) -> None:
    for version in (2, 10):
        (tmp_path / "gcpo" / f"version_{version}").mkdir(parents=True)
    assert latest_version(tmp_path).name == "version_10"  # "version_2" sorts after "version_10" as text
    with pytest.raises(FileNotFoundError, match="no TensorBoard run"):
        latest_version(tmp_path / "gcpo" / "version_2")


def test_a_run_without_its_baseline_is_refused(tmp_path: Path) -> None:
    _fake_run(tmp_path, {49: 0.5, 99: 0.4}, [0.0] * 5)
    with pytest.raises(ValueError, match="no val/accuracy at step 0"):
        summarise(tmp_path)


def test_table_reports_the_worst_seed_against_the_target(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", {0: 0.2, 99: 0.45}, [0.0] * 5)  # +25 points
    _fake_run(tmp_path / "b", {0: 0.2, 99: 0.38}, [0.0] * 5)  # +18 points: misses the target
    good, short = summarise(tmp_path / "a"), summarise(tmp_path / "b")
    lines = table([(0, 150.0, good), (1, 170.0, short)])
    assert lines[2].startswith("| 0 | 150 | 5 | 0.50 | 0: 0.200, 100: 0.450 | 0.200 | 0.450 | 0.450 | +25.0 |")
    assert "Worst seed: 1, +18.0 points; longest run 170 s" in lines[-1] and lines[-1].endswith("NOT met.")
    assert table([(0, 150.0, good)])[-1].endswith(": met.")
    assert table([(0, 181.0, good)])[-1].endswith("NOT met.")  # +25 points but over 3 minutes
