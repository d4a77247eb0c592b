"""The ``lit-gcpo`` command line: configs, a short fit with TensorBoard output, and bad invocations."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_gcpo.running.cli import check_checkpoint, main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_configs_cover_the_three_methods():
    methods = {config.name: config.read_text() for config in CONFIGS}
    assert "method: grpo" in methods["grpo.yaml"]
    assert "method: seed_grpo" in methods["seed_grpo.yaml"]
    assert "method: gcpo" in methods["gcpo.yaml"]


def _short_fit_args(model_dir: str, root: Path, steps: int = 3) -> list[str]:
    return [
        "--config",
        "configs/quickstart.yaml",
        "--model.model",
        model_dir,
        "--model.log_samples_every_n_steps",
        "2",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--data.train.init_args.num_train",
        "64",
        "--data.val.init_args.num_train",
        "64",
        "--data.val.init_args.num_val",
        "8",
        "--data.batch_size",
        "4",
        "--data.group_size",
        "4",
        "--data.rewards",
        "[toy_rewards:digit_fraction, math_accuracy]",
        "--data.accuracy_reward",  # the quickstart's is math_accuracy_final, not in this list
        "math_accuracy",
        "--data.sampling.max_new_tokens",
        "6",
    ]


def test_short_fit_writes_tensorboard_scalars_and_samples(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    cli = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path), "--trainer.num_sanity_val_steps", "-1"])
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "reward/mean",
        "reward/std",
        "reward/math_accuracy_mean",
        "reward/toy_rewards:digit_fraction_mean",
        "train/loss",
        "train/accuracy",
        "train/entropy",
        "train/clip_frac_low",
        "train/zero_spread_frac",
        "completion/length_mean",
        "completion/truncated_frac",
        "time/generate_s",
        "time/reward_s",
        "time/train_s",
        "time/uncertainty_s",
        "rollout/tokens_per_s",
        "uncertainty/weight_mean",
        "uncertainty/bot_mean",
        "val/accuracy",
    }
    assert expected <= scalars, sorted(expected - scalars)
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == [0, 1, 2]
    # the full sanity validation of the starting policy is logged as the step-0 baseline, then step 2's
    assert [event.step for event in accumulator.Scalars("val/accuracy")] == [0, 1]
    logged = [event.value for event in accumulator.Scalars("val/accuracy")]
    assert [value for _, value in cli.model.validation_history] == pytest.approx(logged, abs=1e-6)
    assert "samples/text_summary" in accumulator.Tags()["tensors"]
    exported = Path(cli.model.exported_to)
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer.json").is_file()


def test_invalid_config_value_fails_at_parse_time_naming_the_option(capsys):
    for option, value in [
        ("--model.beta", "-0.1"),
        ("--model.advantage", "ppo"),
        ("--data.batch_size", "0"),
        ("--trainer.gradient_clip_val", "1.0"),  # clipping is --model.max_grad_norm under manual optimization
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", "configs/quickstart.yaml", option, value])
        assert exit_info.value.code != 0
        assert option.removeprefix("--") in capsys.readouterr().err


def test_truncated_checkpoint_gives_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=2)])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    check_checkpoint(str(checkpoint))  # the complete file passes
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt is truncated or corrupt"):
        main(["fit", *_short_fit_args(tiny_model_dir, tmp_path / "again"), "--ckpt_path", str(truncated)])
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        check_checkpoint(str(tmp_path / "absent.ckpt"))


def test_console_script_exits_zero_after_a_run(tiny_model_dir, tmp_path):
    """The installed ``lit-gcpo`` wrapper does ``sys.exit(console_main())``: a finished run must exit 0."""
    import os
    import subprocess
    import sys

    script = "import sys; from lit_gcpo.running.cli import console_main; sys.exit(console_main())"
    args = _short_fit_args(tiny_model_dir, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script, "validate", *args],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},  # the toy reward module
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val/accuracy" in result.stdout


def test_ckpt_path_last_resumes_the_newest_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    first = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=2)])
    assert first.datamodule.consumed_batches == 2
    resumed = main(["fit", *_short_fit_args(tiny_model_dir, tmp_path, steps=4), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert resumed.datamodule.consumed_batches == 4  # continued with the next prompts, not the first
    accumulator = EventAccumulator(resumed.trainer.log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [2, 3]  # only the two new steps ran
    assert resumed.trainer.ckpt_path.endswith("last.ckpt") and str(tmp_path) in resumed.trainer.ckpt_path
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint \(\*\.ckpt\) below"):
        main(["fit", *_short_fit_args(tiny_model_dir, tmp_path / "empty"), "--ckpt_path", "last"])


def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys):
    for option, value in [("--model.model", str(tmp_path / "no_such_model")), ("--model.tokenizer", "./typo/tok")]:
        with pytest.raises(SystemExit):
            main(["fit", "--config", "configs/quickstart.yaml", option, value])
        assert f"{option.removeprefix('--')}: no such directory {value}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [
        [],  # the command line as given: LightningCLI reads sys.argv itself
        # rewritten (lit_gcpo.running.strategy_options): the strategy name becomes its class for the nested option
        ["--trainer.strategy", "fsdp2", "--trainer.strategy.save_distributed_checkpoint", "true"],
    ],
    ids=["as-given", "strategy-rewritten"],
)
def test_a_command_line_run_gets_no_warning_about_args_beside_sys_argv(options):
    """``lit-gcpo fit ...`` printed LightningCLI's "args parameter is intended to run from within Python ... got
    sys.argv[1:]" on every run: the CLI handed LightningCLI its own command line as ``args``."""
    import os
    import subprocess
    import sys

    from lit_gcpo.running.cli import ARGS_BESIDE_ARGV

    script = "import sys; from lit_gcpo.running.cli import console_main; sys.exit(console_main())"
    command = [sys.executable, "-c", script, "fit", "--config", "configs/quickstart.yaml", *options, "--print_config"]
    result = subprocess.run(
        command,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "always"},  # every warning shown, however often
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainer:" in result.stdout  # the configuration was printed: the arguments were parsed
    if options:
        assert "FSDP2Strategy" in result.stdout and "save_distributed_checkpoint: true" in result.stdout
    assert ARGS_BESIDE_ARGV not in result.stderr and "args parameter" not in result.stderr
