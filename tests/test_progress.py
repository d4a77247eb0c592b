"""The progress bar counts optimizer steps out of max_steps (not ``Epoch 0/-2`` of an endless stream)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main


def _train_task(cli):
    bar = next(callback for callback in cli.trainer.callbacks if isinstance(callback, ProgressBar))
    return bar.progress.tasks[bar.train_progress_bar_id]


def test_progress_bar_shows_steps_out_of_max_steps_also_after_a_resume(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=2), "--trainer.enable_progress_bar", "true"]
    first = main(["fit", *args])
    task = _train_task(first)
    assert "step 2/2" in task.description and (task.completed, task.total) == (2, 2)
    resumed = main(["fit", *args, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    task = _train_task(resumed)
    assert "step 3/3" in task.description and (task.completed, task.total) == (3, 3)


def test_no_bar_is_added_when_disabled(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    cli = main(_short_fit_args(tiny_model_dir, tmp_path, steps=1), run=False)  # enable_progress_bar false
    assert not [callback for callback in cli.trainer.callbacks if isinstance(callback, ProgressBar)]
