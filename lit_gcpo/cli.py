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


class GCPOCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyper-parameters right after parsing: check the file first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(str(ckpt_path))


def main(args: list[str] | None = None, run: bool = True) -> GCPOCLI:
    """The ``lit-gcpo`` command; ``run=False`` only builds the trainer, model and data (for scripts)."""
    return GCPOCLI(
        GRPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def console_main() -> None:
    """The ``lit-gcpo`` console script (returns nothing, so a finished run exits with status 0)."""
    main()


if __name__ == "__main__":
    console_main()
