"""Memory per rank of the embedded tiny policy under DDP vs FSDP2 at 2 ranks (CPU, gloo).

    python benchmarks/bench_sharding.py            # writes the "sharding" section of benchmarks/RESULTS.md

Each strategy runs a short GRPO fit (AdamW, 2 optimizer steps, beta 0.04 so that the reference model is
placed too) in 2 processes. Every rank reports the bytes it holds of the policy's parameters, gradients and
AdamW state (an FSDP2 rank holds its shards only: DTensor local tensors), of the reference model, and its
peak RSS (which also counts the Python/torch runtime, the same for both strategies).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_header, write_results_section


def _local_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


class MeasureMemory(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        report = {
            "params": _local_bytes(params),
            "grads_max": _local_bytes(params),  # gradients have the parameters' layout
            "optimizer": _local_bytes(state),
            "reference": _local_bytes(pl_module.reference.model.parameters()),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _child(strategy: str, out: Path) -> None:
    from lit_gcpo.data.datamodule import RolloutDataModule
    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.tasks.arithmetic import ArithmeticTask
    from lit_gcpo.training.module import GRPOModule

    module = GRPOModule(beta=float(os.environ.get("BENCH_BETA", "0.04")), log_samples_every_n_steps=0, export_dir=None)
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=256, num_val=8, seed=0),
        batch_size=4,
        group_size=4,
        sampling=SamplingConfig(max_new_tokens=16),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision=os.environ.get("BENCH_PRECISION", "bf16-mixed"),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[MeasureMemory(out)],
    )
    trainer.fit(module, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return
    rows = {}
    for strategy in ("ddp", "fsdp2"):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, __file__, "--child", strategy, out], check=True, timeout=1200)
            rows[strategy] = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = [
        "## Memory per rank: DDP vs FSDP2 (2 ranks)",
        "",
        f"`python benchmarks/bench_sharding.py`: {run_header()}",
        "",
        "The embedded tiny policy (AdamW, bf16-mixed, beta 0.04), 2 processes with gloo; MiB held by each rank.",
        "",
        "| strategy | rank | parameters | gradients | AdamW state | reference model | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for strategy, ranks in rows.items():
        for rank, r in enumerate(ranks):
            lines.append(
                f"| {strategy} | {rank} | {mib(r['params'])} | {mib(r['grads_max'])} | {mib(r['optimizer'])} | "
                f"{mib(r['reference'])} | {mib(r['peak_rss'])} |"
            )
    ddp, fsdp = rows["ddp"][0], rows["fsdp2"][0]
    ratio = (fsdp["params"] * 2 + fsdp["optimizer"] + fsdp["reference"]) / (
        ddp["params"] * 2 + ddp["optimizer"] + ddp["reference"]
    )
    lines += [
        "",
        f"Model state per rank (parameters + gradients + AdamW + reference), FSDP2 / DDP: {ratio:.2f} (ideal 0.50 "
        "at 2 ranks; the rest of the RSS is the runtime, which sharding does not touch at this size).",
    ]
    write_results_section("sharding", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
