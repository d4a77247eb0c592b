"""``seed_everything`` is the one seed of a run: the prompt order and the sampler derive from it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main


class FirstRollout(L.Callback):
    """Keeps the prompts and completions of the first training rollout."""

    def __init__(self) -> None:
        self.prompts: list[str] | None = None
        self.completions: list[str] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.prompts is None:
            self.prompts, self.completions = list(batch.prompts), list(batch.completions)


def _first_rollout(model_dir: str, root: Path, *extra: str) -> tuple[FirstRollout, object]:
    cli = main([*_short_fit_args(model_dir, root, steps=1), *extra], run=False)
    recorder = FirstRollout()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder, cli


def _saved_config(root: Path) -> dict:
    return yaml.safe_load(next(root.rglob("config.yaml")).read_text())


def test_seed_everything_changes_the_first_rollout_and_an_explicit_data_seed_wins(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(Path(__file__).parents[1])
    a, cli_a = _first_rollout(tiny_model_dir, tmp_path / "a", "--seed_everything", "1")
    a_again, _ = _first_rollout(tiny_model_dir, tmp_path / "a_again", "--seed_everything", "1")
    b, cli_b = _first_rollout(tiny_model_dir, tmp_path / "b", "--seed_everything", "2")
    # same seed: the same run
    assert a.prompts == a_again.prompts and a.completions == a_again.completions
    # another seed: other prompts drawn first (64 training prompts, 4 drawn) and other samples
    assert a.prompts != b.prompts
    assert cli_a.datamodule.seed == 1 and cli_b.datamodule.seed == 2
    # the saved config shows the seed the data used
    assert _saved_config(tmp_path / "a")["data"]["seed"] == 1
    assert _saved_config(tmp_path / "b")["data"]["seed"] == 2
    # an explicit data.seed wins over seed_everything
    c, cli_c = _first_rollout(tiny_model_dir, tmp_path / "c", "--seed_everything", "2", "--data.seed", "1")
    assert cli_c.datamodule.seed == 1
    assert c.prompts == a.prompts and c.completions == a.completions
    assert _saved_config(tmp_path / "c")["data"]["seed"] == 1 and _saved_config(tmp_path / "c")["seed_everything"] == 2


def test_datamodule_without_a_seed_takes_the_global_one(monkeypatch):
    from lit_gcpo.data.datamodule import run_seed

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert run_seed(None) == 0
    L.seed_everything(7)
    assert run_seed(None) == 7
    assert run_seed(3) == 3


def test_the_default_seed_is_fixed_not_random(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    cli = main(["--model.model", tiny_model_dir, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.config.seed_everything == 0 and cli.datamodule.seed == 0
