"""What ``lit-gcpo`` refuses before any model is loaded, and the settings it keeps in one place."""

from __future__ import annotations

import pytest

from lit_gcpo.running.cli import main


def _parse(tmp_path, *options: str):
    # the parsed trainer's logger claims a version directory: the test's, not the repository's runs/
    paths = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return main(["--config", "configs/quickstart.yaml", *paths, *options], run=False)


@pytest.mark.parametrize(
    ("option", "value", "names"),
    [
        ("--trainer.strategy", "deepspeed_stage_2", ["trainer.strategy deepspeed_stage_2", "fsdp2"]),
        ("--trainer.strategy", "fsdp", ["trainer.strategy fsdp", "fsdp2"]),
        ("--trainer.precision", "16-mixed", ["trainer.precision 16-mixed", "bf16-mixed"]),
    ],
)
def test_unsupported_strategy_or_precision_is_refused_at_parse_time(
    option, value, names, capsys, monkeypatch, tmp_path
):
    loaded = []
    monkeypatch.setattr("lit_gcpo.training.module.load_policy", lambda *a, **k: loaded.append(a))
    with pytest.raises(SystemExit) as exit_info:
        _parse(tmp_path, option, value)
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert all(name in message for name in names), message
    assert loaded == []  # refused before any model was loaded


def test_temperature_and_completion_length_come_from_the_sampling(capsys, tmp_path):
    cli = _parse(tmp_path, "--data.sampling.temperature", "0.7", "--data.sampling.max_new_tokens", "17")
    # the model keeps no copy: the batches carry them (tests/test_precision.py checks the loss reads them there)
    assert "temperature" not in cli.model.hparams and "max_completion_length" not in cli.model.hparams
    assert (cli.datamodule.sampling.temperature, cli.datamodule.sampling.max_new_tokens) == (0.7, 17)


def test_temperature_cannot_be_set_twice(capsys, tmp_path):
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--model.temperature", "0.5")
    assert "data.sampling" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["configs/seed_grpo_7b.yaml"])
def test_7b_config_uses_fsdp2_on_several_nodes(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--trainer.num_nodes", "2", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "lit_gcpo.training.parallel.FSDP2Strategy" in printed and "num_nodes: 2" in printed
    assert "Qwen/Qwen2.5-Math-7B" in printed and "precision: bf16-mixed" in printed


def test_readme_sharded_checkpoint_option_parses_after_the_strategy_name(tmp_path):
    """The README's table: ``--trainer.strategy fsdp2`` then ``--trainer.strategy.save_distributed_checkpoint
    true``; jsonargparse took the name for a string and exited 2 on the nested option."""
    strategy = ["--trainer.strategy", "fsdp2", "--trainer.strategy.save_distributed_checkpoint", "true"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", *strategy, "--print_config"])
    assert exit_info.value.code == 0
    from lit_gcpo.training.parallel import FSDP2Strategy

    for given in (strategy, ["--trainer.strategy=fsdp2", *strategy[2:]]):
        trainer = _parse(tmp_path, *given).trainer
        assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.strategy._save_distributed_checkpoint
    assert not _parse(tmp_path, "--trainer.strategy", "fsdp2").trainer.strategy._save_distributed_checkpoint


@pytest.mark.parametrize(
    ("config", "option", "read"),
    [
        ("trainer: {strategy: fsdp2}", "save_distributed_checkpoint", lambda s: s._save_distributed_checkpoint),
        # the registry's own option of "ddp" (start_method popen) is kept next to the refinement
        ("trainer: {strategy: ddp}", "find_unused_parameters", lambda s: s._ddp_kwargs["find_unused_parameters"]),
    ],
)
def test_a_strategy_name_from_a_config_file_is_refined_on_the_command_line(tmp_path, config, option, read):
    """``strategy: fsdp2`` in a config file, ``--trainer.strategy.<option>`` on the command line: jsonargparse took the
    name for a plain string and exited 2 ("Expected a dot import path string: fsdp2")."""
    from lightning.pytorch.strategies import DDPStrategy

    from lit_gcpo.training.parallel import FSDP2Strategy

    path = tmp_path / "strategy.yaml"
    path.write_text(config + "\n")
    refinement = [f"--trainer.strategy.{option}", "true"]
    for given in (["--config", str(path)], [f"--config={path}"], ["--config", config]):  # a file, or YAML text
        strategy = _parse(tmp_path, *given, *refinement).trainer.strategy
        assert isinstance(strategy, FSDP2Strategy if "fsdp2" in config else DDPStrategy)
        assert read(strategy) is True
    if "ddp" in config:
        assert strategy._start_method == "popen"
    # a later --trainer.strategy wins over the file, as jsonargparse reads them: in order
    later = ["--trainer.strategy", "fsdp2", "--trainer.strategy.process_group_backend", "gloo"]
    strategy = _parse(tmp_path, "--config", str(path), *later).trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy._process_group_backend == "gloo"


def test_a_strategy_name_before_the_subcommand_is_refined_after_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("fit:\n  trainer:\n    strategy: fsdp2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "fit", "--config", "configs/quickstart.yaml",
              "--trainer.strategy.save_distributed_checkpoint", "true", "--print_config"])  # fmt: skip
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lit_gcpo.training.parallel.FSDP2Strategy" in printed
    assert "save_distributed_checkpoint: true" in printed


@pytest.mark.parametrize(
    ("config", "shown"), [(None, "unset (Lightning's 'auto')"), ("trainer: {strategy: auto}", "'auto'")]
)
def test_a_strategy_option_without_a_strategy_class_says_how_to_write_it(tmp_path, capsys, config, shown):
    given = []
    if config is not None:
        (tmp_path / "auto.yaml").write_text(config + "\n")
        given = ["--config", str(tmp_path / "auto.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        _parse(tmp_path, *given, "--trainer.strategy.save_distributed_checkpoint", "true")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"--trainer.strategy.save_distributed_checkpoint: trainer.strategy is {shown}" in message
    assert "--trainer.strategy fsdp2 --trainer.strategy.save_distributed_checkpoint VALUE" in message
