"""``lit-gcpo fit|validate|test|predict``: LightningCLI over GRPOModule and RolloutDataModule.

The uncertainty callback and the checkpoints are ordinary Trainer callbacks in the config files.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

# Must precede the first torch import: with vLLM and the trainer in one process, OpenMP busy-waiting
# between their two thread pools made generation 7x slower (shared/VLLM_NOTES.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.module import GRPOModule
from lit_gcpo.resume import check_resume
from lit_gcpo.run_dir import claim_logger_directory


def check_checkpoint(path: str) -> None:
    """Fail early, naming the file, when a checkpoint is missing, truncated or not a torch archive."""
    if path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
        return
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {path}")
    if not zipfile.is_zipfile(file):
        raise ValueError(
            f"ckpt_path: {path} is truncated or corrupt ({file.stat().st_size} bytes, not a complete torch "
            "archive); resume from an earlier checkpoint, e.g. another file in the same directory"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"ckpt_path: {path} is truncated or corrupt ({err})") from err
    if bad is not None:
        raise ValueError(f"ckpt_path: {path} is corrupt (member {bad} fails its checksum)")


def latest_last_checkpoint(root: str) -> str:
    """The most recently written ``last.ckpt`` below ``root`` (every run's logger makes a new version
    directory, so Lightning's own ``"last"``, which looks in the new run's directory, would find nothing)."""
    candidates = sorted(Path(root).rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"ckpt_path last: no last.ckpt below trainer.default_root_dir={root}")
    return str(candidates[-1])


class GCPOCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path last`` to the newest ``last.ckpt`` of the run's root directory
    and checks a checkpoint file before anything reads it."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].trainer.get("gradient_clip_val"):
            parser.error(
                "trainer.gradient_clip_val: GRPOModule steps its optimizer itself (several steps per rollout "
                "batch), where Lightning cannot clip; use --model.max_grad_norm instead"
            )
        if not subcommand or not self.config[subcommand].get("ckpt_path"):
            return
        config = self.config[subcommand]
        if config.ckpt_path == "last":
            config.ckpt_path = latest_last_checkpoint(config.trainer.default_root_dir or ".")
        check_checkpoint(str(config.ckpt_path))

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's copying of the checkpoint's hyper-parameters over the parsed settings (which
        dropped explicit ones silently) by ``lit_gcpo.resume``'s rule: settings from the configuration, state
        from the checkpoint, contradictions refused, and what came from where printed."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            print(check_resume(str(path), self.config[subcommand]))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # seed_everything is the run's one seed: the data's seed (prompt order, sampling) follows it unless
        # set explicitly, and is written into the saved config.yaml.
        seed = config.get("seed_everything")
        if config.get("data") is not None and config.data.get("seed") is None and not isinstance(seed, bool):
            config.data.seed = seed

    def after_instantiate_classes(self) -> None:
        # Claim the log directory before anything (config, checkpoints, events, the exported policy) is written
        # there. Only rank 0 writes into it; other ranks get its path from rank 0 through ``trainer.log_dir``.
        if self.trainer.loggers and self.trainer.global_rank == 0:
            directory = claim_logger_directory(self.trainer.loggers[0])
            if directory is not None:
                print(f"run directory: {directory}")


def main(args: list[str] | None = None, run: bool = True) -> GCPOCLI:
    """The ``lit-gcpo`` command; ``run=False`` only builds the trainer, model and data (for scripts)."""
    return GCPOCLI(
        GRPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def console_main() -> None:
    """The ``lit-gcpo`` console script (returns nothing, so a finished run exits with status 0)."""
    main()


if __name__ == "__main__":
    console_main()
