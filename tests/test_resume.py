"""``--ckpt_path``: the checkpoint gives the state, the configuration every setting; contradictions are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main
from lit_gcpo.running.resume import ResumeMismatchError

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> str:
    """A real 2-step checkpoint of the quickstart config on the tiny model (max_grad_norm 1, warmup 10, beta 0)."""
    root = tmp_path_factory.mktemp("trained")
    cwd = Path.cwd()
    try:
        os.chdir(REPO)
        main(["fit", *_short_fit_args(tiny_model_dir, root, steps=2)])
    finally:
        os.chdir(cwd)
    return str(next(root.rglob("last.ckpt")))


def test_explicit_settings_given_with_ckpt_path_are_applied_and_printed(
    tiny_model_dir, checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    changes = ["--model.max_grad_norm", "0.5", "--model.warmup_steps", "3", "--model.beta", "0.1"]
    cli = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=3), *changes, "--ckpt_path", checkpoint])
    assert cli.trainer.global_step == 3  # resumed at step 2, one more step
    hparams = cli.model.hparams
    assert (hparams.max_grad_norm, hparams.warmup_steps, hparams.beta) == (0.5, 3, 0.1)
    assert cli.model.reference is not None  # beta > 0 loaded the reference model
    out = capsys.readouterr().out
    assert f"resuming from {checkpoint}" in out and "step 2" in out
    assert "model.max_grad_norm: 0.5 (the checkpoint has 1.0)" in out
    assert "model.warmup_steps: 3 (the checkpoint has 10)" in out
    assert "model.beta: 0.1 (the checkpoint has 0.0)" in out


def test_another_model_than_the_checkpoints_is_refused(checkpoint, tmp_path, monkeypatch):
    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model

    monkeypatch.chdir(REPO)
    wider = tmp_path / "wider"
    build_tiny_model(
        build_tiny_config(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    ).save_pretrained(wider)
    build_char_tokenizer().save_pretrained(wider)
    with pytest.raises(ResumeMismatchError, match=r"model\.model: '.*wider' \(the checkpoint has '.*tiny-random"):
        main(["fit", *_short_fit_args(str(wider), tmp_path / "run", steps=3), "--ckpt_path", checkpoint])
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # refused before training


def test_an_optimizer_setting_the_restored_state_would_override_is_refused(
    tiny_model_dir, checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=3), "--model.optimizer.init_args.lr", "0.01"]
    with pytest.raises(
        ResumeMismatchError, match=r"optimizer\.init_args\.lr: 0\.01 \(the checkpoint's optimizer state has 0\.0003"
    ):
        main(["fit", *args, "--ckpt_path", checkpoint])
