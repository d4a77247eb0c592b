"""``lit-gcpo fit|validate|test|predict``: LightningCLI over GRPOModule and RolloutDataModule.

``predict`` writes completions of ``data.predict`` as JSON lines (``lit_gcpo.running.prediction``).

The uncertainty callback and the checkpoints are ordinary Trainer callbacks in the config files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_gcpo.running.wait_policy import wait_policy_variables

# Must precede the first torch import (OpenMP reads it once): PASSIVE unless the user set OMP_WAIT_POLICY
# (lit_gcpo.running.wait_policy has the measurements behind it).
os.environ.update(wait_policy_variables(os.environ))

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_gcpo.algorithms.label_free import LabelFreeReward
from lit_gcpo.algorithms.rollout_correction import rollout_correction_problem
from lit_gcpo.algorithms.surrogate_options import Surrogate
from lit_gcpo.algorithms.token_selection import TokenSelection
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.data.label_free import label_free_problem
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.rewards.combine import RewardError
from lit_gcpo.rewards.loading import import_object
from lit_gcpo.running.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint,
    newest_complete_checkpoint,
    remove_stale_temporary_files,
)
from lit_gcpo.running.last_checkpoint import SIGTERM_EXIT_CODE, take_over_save_last
from lit_gcpo.running.prediction import PredictionWriter
from lit_gcpo.running.progress import StepProgressBar
from lit_gcpo.running.resume import check_resume
from lit_gcpo.running.run_dir import RunDirectoryTakenError, claim_directory, claim_logger_directory, release_directory
from lit_gcpo.running.sharded_checkpoint import META_FILE
from lit_gcpo.running.strategy_options import StrategyOptionError, strategy_names_as_classes
from lit_gcpo.training.module import GRPOModule
from lit_gcpo.training.options import loss_options_problem
from lit_gcpo.training.parallel import unsupported_option

DESCRIPTION = (
    "lit-gcpo: uncertainty-aware reinforcement learning of language models (GRPO, Dr. GRPO, SEED-GRPO, GCPO) on "
    "PyTorch Lightning. `fit` trains a policy on rollouts (e.g. --config configs/quickstart.yaml), `validate` and "
    "`test` evaluate one, `predict` writes a policy's completions of a prompt file (data.predict), with their "
    "rewards where the rows have gold answers, to predictions.jsonl. Set --seed_everything to choose the run's seed."
)


# A method family is an option typed by its base class (``model.token_selection``, ``data.label_free``): each method
# is a subclass, chosen by ``class_path`` (or its class name), with its own typed options, validated at parse time.
set_parsing_settings(subclasses_enabled=[TokenSelection, LabelFreeReward, Surrogate])

MOVED_SETTINGS = {
    "model.temperature": "the sampling temperature is set once, in data.sampling.temperature (batches carry it)",
    "model.max_completion_length": "L_max is set once, in data.sampling.max_new_tokens (batches carry it)",
    "model.policy_embeddings": "the policy's embeddings are computed when a callback's rollout_fields asks for them",
    "data.cluster_answers": "answers are clustered when a callback's rollout_fields asks for answer_clusters",
}
"""Options that each decided a setting decided elsewhere too, and where that setting lives now."""


ARGS_BESIDE_ARGV = "LightningCLI's args parameter is intended to run from within Python"
"""The start of LightningCLI's warning about ``args`` given while ``sys.argv`` holds arguments too."""


@contextlib.contextmanager
def _command_line_rewritten(rewritten: bool) -> Iterator[None]:
    """While open, LightningCLI's :data:`ARGS_BESIDE_ARGV` warning is not shown when ``rewritten``: the ``args``
    it would warn about are the command line itself, rewritten (``strategy_names_as_classes``). LightningCLI has
    no option for it (it warns whenever ``args`` is given and ``sys.argv`` has arguments)."""
    if not rewritten:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ARGS_BESIDE_ARGV)
        yield


def _has_rich() -> bool:
    return importlib.util.find_spec("rich") is not None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def missing_model_path(value: str | None) -> str | None:
    """Why ``value`` (a model or tokenizer option) names no model, when it is a local path that does not exist;
    None otherwise. Without this check transformers answered "Repo id must be in the form ..." for a
    mistyped directory. A hub id has the form ``name`` or ``org/name``."""
    if not value or value.startswith("lit-gcpo/"):
        return None
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
    path = Path(value).expanduser()
    if looks_local and not path.exists():
        return f"no such directory {value} (a local model path; hub ids have the form 'org/name')"
    if path.is_file():
        return f"{value} is a file; give the directory that holds the model's config.json"
    return None


METHOD_OPTIONS = (("model", "token_selection"), ("model", "surrogate"), ("data", "label_free"))
"""The options whose value is a method with options of its own (a subclass of the option's type)."""


def method_options_problem(config: Any) -> str | None:
    """Why the methods chosen in ``config`` are refused, naming the option; None when they are fine. Each method of
    ``METHOD_OPTIONS`` is built from its options (which it validates: rho outside (0, 1], delta_lo >= delta_hi, ...),
    then the loss options against the surrogate (``lit_gcpo.training.options.loss_options_problem``) and label-free
    training's reward settings (``lit_gcpo.data.label_free.label_free_problem``)."""
    built: dict[str, Any] = {}
    for group, option in METHOD_OPTIONS:
        section = config.get(group)
        value = section.get(option) if section is not None else None
        if value is None or not hasattr(value, "class_path"):  # unset, or already an object
            built[option] = value
            continue
        init_args = _plain_namespace(value.get("init_args") or {})
        try:
            built[option] = import_object(value.class_path)(**init_args)
        except (TypeError, ValueError) as error:
            return f"{group}.{option}: {error}"
    model = config.get("model")
    if model is not None:
        problem = loss_options_problem({**_plain_namespace(model), **built})
        if problem is not None:
            return f"model.{problem}"
    data = config.get("data")
    if data is None or built["label_free"] is None:
        return None
    rewards, dynamic = list(data.get("rewards") or []), data.get("dynamic_sampling") is not None
    return label_free_problem(built["label_free"], rewards, data.get("accuracy_reward"), dynamic)


def sampling_problem(config: Any) -> str | None:
    """Why ``data.sampling`` is refused, naming the option; None when it is fine or unset: its settings against
    each other (``min_tokens <= max_new_tokens``, ...; jsonargparse checks each field's type, and the dataclass's
    own checks would otherwise run only when the DataModule is built, as a traceback), and ``min_tokens =
    max_new_tokens`` (every completion truncated) with ``model.mask_truncated_completions`` (all out of the loss)."""
    data = config.get("data")
    sampling = data.get("sampling") if data is not None else None
    if sampling is None:
        return None
    try:
        sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**_plain_namespace(sampling))
    except (TypeError, ValueError) as error:
        return f"data.{error}"
    model = config.get("model")
    if model is not None and model.get("mask_truncated_completions") and sampling.min_tokens == sampling.max_new_tokens:
        return (
            f"data.sampling.min_tokens = max_new_tokens = {sampling.max_new_tokens} makes every completion run to the "
            "limit (truncated), and model.mask_truncated_completions would leave all of them out of the loss"
        )
    return None


def runs_directory(trainer: Any) -> Path:
    """Where the runs of this configuration keep their checkpoints: the first logger's ``save_dir/name`` (its
    versions), or ``default_root_dir`` without a logger. ``--ckpt_path last`` searches only there: below the
    whole ``default_root_dir`` it resumed another configuration's run (other group size and reward) silently."""
    root = Path(trainer.get("default_root_dir") or ".")
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    if logger is False or (isinstance(logger, list) and not logger):
        return root
    if logger is None or logger is True:  # Lightning's default logger
        return root / "lightning_logs"
    init_args = _plain_namespace(getattr(logger, "init_args", None) or {})
    save_dir = Path(init_args.get("save_dir") or root)
    name = init_args.get("name", "lightning_logs")
    return save_dir / name if name else save_dir


def _plain_namespace(value: Any) -> dict[str, Any]:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


class GCPOCLI(LightningCLI):
    """LightningCLI for lit-gcpo runs, made safe against lost or silently changed work:

    - ``seed_everything`` is the one seed: ``data.seed`` follows it unless set (the saved config shows it);
    - the run claims its log directory before writing (``lit_gcpo.running.run_dir``): never another run's;
    - checkpoints are written atomically (``lit_gcpo.running.checkpointing``), ``--ckpt_path last`` is the newest
      complete checkpoint of this configuration's runs (:func:`runs_directory`) and a checkpoint is checked
      before use (a sharded one without running code, ``lit_gcpo.running.sharded_checkpoint``);
    - ``last.ckpt`` is always the newest checkpoint, and SIGTERM stops a fit with one and exit status 143
      (``lit_gcpo.running.last_checkpoint``); a run that fails before writing anything gives its directory back;
    - with ``--ckpt_path`` the settings come from the configuration and contradictions with the checkpoint are
      refused (``lit_gcpo.running.resume``).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        from_command_line = args is None
        given = sys.argv[1:] if from_command_line else args
        for option in given if isinstance(given, (list, tuple)) else []:
            name = str(option).split("=", 1)[0].removeprefix("--")
            if name in MOVED_SETTINGS:
                parser.error(f"{name} is no longer an option: {MOVED_SETTINGS[name]}")
        if from_command_line or isinstance(args, (list, tuple)):
            try:
                rewritten = strategy_names_as_classes(list(given))
            except StrategyOptionError as error:
                parser.error(str(error))
            if not from_command_line or rewritten != list(given):
                args = rewritten  # else None: LightningCLI reads sys.argv itself
        with _command_line_rewritten(from_command_line and args is not None):
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].trainer.get("gradient_clip_val"):
            parser.error(
                "trainer.gradient_clip_val: GRPOModule steps its optimizer itself (several steps per rollout "
                "batch), where Lightning cannot clip; use --model.max_grad_norm instead"
            )
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.trainer
        reason = unsupported_option(trainer.get("strategy"), trainer.get("precision"))
        if reason is not None:  # before any model is loaded
            parser.error(reason)
        for option in ("model", "tokenizer") if subcommand else ():
            problem = missing_model_path(self.config[subcommand].model.get(option))
            if problem:
                parser.error(f"model.{option}: {problem}")
        model = config.get("model")
        if model is not None:  # the bounds against each other (each option's own type checked its sign)
            bounds = (model.get(f"rollout_correction{end}") for end in ("", "_min", "_max"))
            problem = rollout_correction_problem(*bounds)
            if problem:
                parser.error(f"model.{problem}")
        problem = method_options_problem(config) or sampling_problem(config)
        if problem:
            parser.error(problem)
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        config = self.config[subcommand]
        if config.ckpt_path == "last":
            runs = runs_directory(config.trainer)
            config.ckpt_path = newest_complete_checkpoint(str(runs))
            print(
                f"--ckpt_path last: {config.ckpt_path}, the newest complete checkpoint below {runs} (the runs of this "
                "configuration's logger; other runs under trainer.default_root_dir are not considered)"
            )
        check_checkpoint(str(config.ckpt_path))

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's copying of the checkpoint's hyper-parameters over the parsed settings (which
        dropped explicit ones silently) by ``lit_gcpo.running.resume``'s rule: settings from the configuration, state
        from the checkpoint, contradictions refused, and what came from where printed."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and (Path(path).is_file() or (Path(path) / META_FILE).is_file()):
            print(check_resume(str(path), self.config[subcommand], training=subcommand == "fit"))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # seed_everything is the run's one seed: the data's seed (prompt order, sampling) follows it unless
        # set explicitly, and is written into the saved config.yaml.
        seed = config.get("seed_everything")
        if config.get("data") is not None and config.data.get("seed") is None and not isinstance(seed, bool):
            config.data.seed = seed

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, writing its checkpoints atomically unless a CheckpointIO plugin is given, and
        showing steps out of ``max_steps`` unless a progress bar is given or disabled."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = _as_list(kwargs.pop("plugins", None) or config.get("plugins"))
        strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)  # a strategy object's own
        if strategy_io is None and not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = _as_list(kwargs.pop("callbacks", None) or config.get("callbacks"))
        enabled = config.get("enable_progress_bar") is not False
        if enabled and _has_rich() and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            callbacks.append(StepProgressBar())
        if self.subcommand in (None, "fit"):  # last.ckpt is the newest checkpoint; SIGTERM stops with one
            callbacks = take_over_save_last(callbacks, enabled=config.get("enable_checkpointing") is not False)
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter())
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)

    def after_instantiate_classes(self) -> None:
        # Claim the log directory before anything (config, checkpoints, events, the exported policy) is written
        # there. Only rank 0 writes into it; other ranks get its path from rank 0 through ``trainer.log_dir``.
        self._claimed: Path | None = None
        if self.trainer.global_rank != 0:
            return
        if self.trainer.loggers:
            directory = self._claimed = claim_logger_directory(self.trainer.loggers[0])
        else:  # without a logger the run writes its config and checkpoints into default_root_dir itself
            directory = Path(self.trainer.default_root_dir)
            # evaluation without a logger writes only its report files, and re-running it into the same
            # directory is how an interrupted evaluation resumes
            if claim_directory(directory):
                self._claimed = directory
            elif self.subcommand not in ("test", "validate", "predict"):
                raise RunDirectoryTakenError(
                    f"trainer.default_root_dir {directory} already holds a run, and without a logger this run would "
                    "write its config and checkpoints there too; choose another directory, or use a logger (each "
                    "run then gets a new version_N)"
                )
        if directory is not None:
            print(f"run directory: {directory}")
        if self.subcommand in (None, "fit"):  # left by runs killed inside a checkpoint write
            config = self.config[self.subcommand] if self.subcommand else self.config
            removed = remove_stale_temporary_files(runs_directory(config.trainer))
            if removed:
                print(f"removed the temporary checkpoint files of killed runs: {', '.join(map(str, removed))}")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as stop:  # Lightning's exit without a code reported a preempted run as a success
            self._release_unused_directory()
            raise SystemExit(SIGTERM_EXIT_CODE) from stop
        except BaseException:
            self._release_unused_directory()
            raise

    def _release_unused_directory(self) -> None:
        """A run that failed before writing anything gives its claimed directory back (it held only the claim)."""
        if getattr(self, "_claimed", None) is not None and release_directory(self._claimed):
            print(f"released the run directory {self._claimed}: the run failed before writing anything there")

    def after_fit(self) -> None:
        # A short run (fewer batches than RewardSet.max_unusable_batches) whose rewards never scored anything
        # learned nothing: say so with a failure rather than exit 0.
        rewards = getattr(getattr(self.datamodule, "collector", None), "rewards", None)
        if rewards is not None and rewards.scored_batches and not rewards.usable_batches:
            raise RewardError(
                f"no batch of this run had a usable reward ({rewards.scored_batches} batches scored by "
                f"{rewards.names}): it learned nothing. The reward/<name>_failures, _invalid and _timeouts "
                "metrics and the warnings above say why"
            )


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's config.yaml; a training run never replaces another's (its directory is its own, see
    ``after_instantiate_classes``), while an evaluation re-run into its directory is how it resumes and
    replaces the interrupted run's config."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.overwrite = stage != "fit"
        super().setup(trainer, pl_module, stage)


def main(args: list[str] | None = None, run: bool = True) -> GCPOCLI:
    """The ``lit-gcpo`` command; ``run=False`` only builds the trainer, model and data (for scripts)."""
    return GCPOCLI(
        GRPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_callback=RunConfigSaver,
        parser_kwargs={"description": DESCRIPTION},
        # A run is reproducible unless asked otherwise (Lightning's default, True, draws a random seed).
        seed_everything_default=0,
    )


def console_main() -> None:
    """The ``lit-gcpo`` console script (returns nothing, so a finished run exits with status 0)."""
    main()


if __name__ == "__main__":
    console_main()
