"""``--ckpt_path``: the checkpoint gives the state, the configuration every setting; contradictions are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main
from lit_gcpo.running.resume import ResumeMismatchError, convert_data_position

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


def test_a_new_batch_size_continues_at_the_same_prompt_and_data_changes_are_printed(
    tiny_model_dir, checkpoint, tmp_path, monkeypatch, capsys, recwarn
):
    """The checkpoint consumed 2 batches of 4 prompts on 1 rank: 8 prompts, i.e. 1 batch of 8. Unconverted, the
    run skipped to batch 2 (prompts 16-23) and never trained on prompts 8-15."""
    monkeypatch.chdir(REPO)
    changes = ["--data.batch_size", "8", "--data.group_size", "2", "--data.rewards", "[math_accuracy]"]
    cli = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=3), *changes, "--ckpt_path", checkpoint])
    assert cli.trainer.global_step == 3
    assert cli.datamodule.consumed_batches == 2  # converted position 1, plus the one new step
    out = capsys.readouterr().out
    assert "data.batch_size: 8 (the checkpoint has 4); the data position is converted" in out
    assert "data.group_size: 2 (the checkpoint has 4)" in out
    assert "data.rewards: ['math_accuracy'] (the checkpoint has ['toy_rewards:digit_fraction', 'math_accuracy'])" in out
    warned = [str(w.message) for w in recwarn if "data position converted" in str(w.message)]
    assert warned and "= 8 prompts" in warned[0] and "continues at batch 1 (prompt 8, the next one)" in warned[0]


def test_convert_data_position_counts_prompts():
    state = {"consumed_batches": 3, "batch_size": 4, "world_size": 2}  # 3 x 4 x 2 = 24 prompts
    assert convert_data_position(state, 4, 2) == (3, None)
    assert convert_data_position(state, 8, 1)[0] == 3  # 24 / 8
    assert convert_data_position(state, 6, 2)[0] == 2  # 24 / 12
    batches, message = convert_data_position(state, 5, 1)  # 24 / 5 = 4.8: batch 5 starts at prompt 25
    assert batches == 5 and "prompt 25, skipping 1 prompts" in message
    assert convert_data_position({"consumed_batches": 3}, 5, 1) == (3, None)  # a checkpoint from before


def test_another_optimizer_class_than_the_checkpoints_is_refused(tiny_model_dir, checkpoint, tmp_path, monkeypatch):
    """AdamW's state restored into SGD gave a bare KeyError: 'momentum' at the first step."""
    monkeypatch.chdir(REPO)
    sgd = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.0003"]
    args = [*_short_fit_args(tiny_model_dir, tmp_path, steps=3), *sgd, "--model.optimizer.init_args.momentum", "0.9"]
    with pytest.raises(ResumeMismatchError, match=r"model\.optimizer: torch\.optim\.sgd\.SGD, but the checkpoint's "):
        main(["fit", *args, "--ckpt_path", checkpoint])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ckpt_path_last_takes_this_configurations_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Run b (another logger name: another configuration) is newer; resuming a with ``last`` took b's checkpoint."""
    monkeypatch.chdir(REPO)

    def args(name: str, steps: int) -> list[str]:
        return [*_short_fit_args(tiny_model_dir, tmp_path, steps=steps), "--trainer.logger.init_args.name", name]

    main(["fit", *args("a", 1)])
    main(["fit", *args("b", 1), "--data.group_size", "2"])
    capsys.readouterr()
    resumed = main(["fit", *args("a", 2), "--ckpt_path", "last"])
    assert Path(resumed.trainer.ckpt_path).parents[2] == tmp_path / "a"
    assert resumed.trainer.global_step == 2
    assert f"the newest complete checkpoint below {tmp_path / 'a'}" in capsys.readouterr().out


def test_a_sharded_checkpoint_is_compared_with_the_settings_too(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sharded = ["--trainer.strategy", "fsdp2", "--trainer.strategy.save_distributed_checkpoint", "true"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    fit_args = _short_fit_args(tiny_model_dir, tmp_path, 2)
    command = [sys.executable, "-m", "lit_gcpo.running.cli", "fit", *fit_args, *sharded]
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=600, capture_output=True)
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    assert checkpoint.is_dir()  # the sharded format under test
    args = [*_short_fit_args(tiny_model_dir, tmp_path / "again", steps=3), *sharded]
    with pytest.raises(
        ResumeMismatchError, match=r"optimizer\.init_args\.lr: 0\.01 \(the checkpoint's optimizer state has 0\.0003"
    ):
        main(["fit", *args, "--model.optimizer.init_args.lr", "0.01", "--ckpt_path", str(checkpoint)])
    with pytest.raises(ResumeMismatchError, match=r"model\.optimizer: torch\.optim\.sgd\.SGD"):
        main(["fit", *args, "--model.optimizer", "torch.optim.SGD", "--ckpt_path", str(checkpoint)])
