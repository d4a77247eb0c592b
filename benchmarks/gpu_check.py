"""GPU acceptance run: the paper-scale path measured on the first machine with a GPU, in one command.

    python gpu_check.py --out gpu_check.json          # one CUDA GPU (budget: 8 minutes on one H100)
    python gpu_check.py --cpu-smoke --out smoke.json  # the same code on the CPU with the embedded tiny policy

What it runs, with lit-gcpo's own components (``GRPOModule``, ``RolloutDataModule`` with the ``hf`` engine, a
Lightning ``Trainer`` with the project's strategy names, ``bf16-mixed``):

1. a policy with Qwen2.5-Math-1.5B's architecture (``lit_gcpo/assets/qwen2.5-math-1.5b-config.json``) and random
   weights, written to a work directory with a character tokenizer padded to the model's 151,936 ids (built in
   code, saved in a folder of its own: next to a Qwen2 ``config.json``, ``AutoTokenizer`` would swap in Qwen2's
   pre-tokenizer); the ``model`` check compares its parameter count with the architecture's 1,543,714,304. Nothing is
   downloaded. ``--cpu-smoke`` uses ``lit-gcpo/tiny-arith`` instead, with 16 and 48 new tokens;
2. ``rollout_short``: 2 training steps of 8 prompts x 8 completions of up to 512 new tokens; ``rollout_long``: 1
   step of 4 x 8 completions of up to 2,048 tokens. Each gives generation tokens/s (sampled tokens over the
   engine's ``time/generate_s``) and training tokens/s (prompt and completion tokens of the batch through the
   loss's forward and backward passes and the optimizer step, over the step's wall time, CUDA synchronised);
3. the on-policy ratio: a callback asks for ``old_logprobs``, so the rollout's scoring pass (no grad) supplies the
   old log-probs and the loss's ratio exp(logp - old_logp) compares two forward passes with the same weights; on the
   first optimizer step every token's ratio must be 1 within 1e-6 (``train/ratio_min`` / ``train/ratio_max``);
4. peak GPU memory (``torch.cuda.max_memory_allocated``) of each part;
5. ``checkpoint_resume``: the checkpoint written after ``rollout_short`` is resumed by a new module and trainer;
   weights and optimizer state must equal the saved ones exactly, then one more step runs;
6. ``fsdp2_step``: one optimizer step under ``--trainer.strategy fsdp2`` with one rank;
7. what needs a package the acceptance machine does not get from ``scripts/gpu_wheels.sh`` (vLLM) is reported as
   ``skipped``, with the reason; ``time_budget``: the run (after the imports) within 480 s (smoke: 240 s).

Room it needs on the GPU machine: about 22 GB in ``--work-dir`` (the bf16 model and a 17 GiB checkpoint of fp32
weights and Adam moments) and about 45 GB of host memory while resuming (the copy of the saved state it compares with,
and Lightning's load of the checkpoint).

The JSON file holds every measurement and a status (``pass``, ``fail``, ``skipped``) per check; the exit status is 1
when a check failed. Rewards: the share of digits among a completion's characters (registered as
``gpu_check_digit_share``: a random policy's completions differ in it, so the advantages and the gradient are not
zero) plus ``math_accuracy`` (the math-verify grader, as the papers' configs use it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")  # nothing is downloaded

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import lit_gcpo.assets  # noqa: E402
from lit_gcpo.assets.tiny_model import TINY_MODEL_NAME, VOCAB, build_char_tokenizer  # noqa: E402
from lit_gcpo.data.datamodule import RolloutDataModule  # noqa: E402
from lit_gcpo.engines.base import SamplingConfig  # noqa: E402
from lit_gcpo.rewards import REWARDS  # noqa: E402
from lit_gcpo.running.checkpointing import AtomicCheckpointIO  # noqa: E402
from lit_gcpo.tasks.arithmetic import ArithmeticTask  # noqa: E402
from lit_gcpo.training.module import GRPOModule  # noqa: E402
from lit_gcpo.training.parallel import full_tensor  # noqa: E402

ARCHITECTURE_CONFIG = Path(lit_gcpo.assets.__file__).parent / "qwen2.5-math-1.5b-config.json"
DIGIT_SHARE = "gpu_check_digit_share"
RATIO_TOLERANCE = 1e-6
# Embeddings 151,936 x 1,536 (tied with the LM head) = 233,373,696; per layer q 1,536^2 + 1,536 (bias), k and v
# 1,536 x 256 + 256 each (2 KV heads of 128), o 1,536^2, MLP 3 x 1,536 x 8,960, two norms 3,072: 46,797,824; 28
# layers 1,310,339,072; final norm 1,536. Qwen's model card: 1.54B, 1.31B without embeddings.
EXPECTED_PARAMETERS = 1_543_714_304
GIB = 1024**3


def digit_share(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float | None]:
    """The fraction of a completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in completions]


def register_rewards() -> None:
    """Make ``digit_share`` a reward by name (``DIGIT_SHARE``) in this process: done by ``run``, not on import, so
    that importing this file (as the tests do) leaves the project's reward registry as it was."""
    if DIGIT_SHARE not in REWARDS:
        REWARDS.add(DIGIT_SHARE, digit_share)


@dataclass(frozen=True)
class Size:
    """One training run's work: ``prompts`` x ``group_size`` completions of up to ``max_new_tokens`` tokens,
    ``micro_batch_size`` completions per forward/backward pass (0: all), ``steps`` optimizer steps."""

    max_new_tokens: int
    prompts: int
    group_size: int
    micro_batch_size: int
    steps: int

    def record(self) -> dict[str, Any]:
        """The size as a part's record starts it (``steps_planned``: ``steps`` holds the recorded steps)."""
        fields = asdict(self)
        fields["steps_planned"] = fields.pop("steps")
        return fields


@dataclass(frozen=True)
class Plan:
    """What one mode runs."""

    mode: str
    accelerator: str
    precision: str
    short: Size
    long: Size
    fsdp2: Size
    resume: Size
    time_budget_s: float


GPU_PLAN = Plan(
    mode="gpu",
    accelerator="gpu",
    precision="bf16-mixed",
    # micro-batches of about 4k tokens keep the activations of the 1.5B model near 15 GiB
    short=Size(max_new_tokens=512, prompts=8, group_size=8, micro_batch_size=8, steps=2),
    long=Size(max_new_tokens=2048, prompts=4, group_size=8, micro_batch_size=2, steps=1),
    fsdp2=Size(max_new_tokens=64, prompts=2, group_size=4, micro_batch_size=0, steps=1),
    resume=Size(max_new_tokens=32, prompts=2, group_size=4, micro_batch_size=0, steps=1),
    time_budget_s=480.0,
)
SMOKE_PLAN = Plan(
    mode="cpu-smoke",
    accelerator="cpu",
    precision="bf16-mixed",  # CPU autocast in bf16 runs (tests/test_precision.py)
    short=Size(max_new_tokens=16, prompts=2, group_size=4, micro_batch_size=0, steps=2),
    long=Size(max_new_tokens=48, prompts=2, group_size=4, micro_batch_size=4, steps=1),
    fsdp2=Size(max_new_tokens=8, prompts=2, group_size=4, micro_batch_size=0, steps=1),
    resume=Size(max_new_tokens=8, prompts=2, group_size=4, micro_batch_size=0, steps=1),
    time_budget_s=240.0,
)


# ------------------------------------------------------------------------------------------ the policy
def architecture_config(path: Path = ARCHITECTURE_CONFIG, **overrides: Any) -> Any:
    """The transformers config of the JSON file ``path`` (``overrides`` replace its fields)."""
    fields = {**json.loads(path.read_text()), **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def padded_char_tokenizer(vocab_size: int, max_length: int) -> Any:
    """lit-gcpo's character tokenizer, its vocabulary filled up to ``vocab_size`` ids with tokens ``<k>``: every id
    a random policy samples decodes to text (an id unknown to the tokenizer would decode to nothing)."""
    fillers = tuple(f"<{index}>" for index in range(vocab_size - len(VOCAB)))
    tokenizer = build_char_tokenizer(VOCAB + fillers)
    tokenizer.model_max_length = max_length
    return tokenizer


def write_random_policy(config: Any, directory: Path, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A random-weight model of ``config`` (bf16 on disk) in ``directory/model`` and its tokenizer in
    ``directory/tokenizer``; returns the two paths and the parameter count."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(directory / "model")
    del model
    padded_char_tokenizer(config.vocab_size, config.max_position_embeddings).save_pretrained(directory / "tokenizer")
    return {
        "model": str(directory / "model"),
        "tokenizer": str(directory / "tokenizer"),
        "parameters": parameters,
        "build_s": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------ recording
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRecorder(L.Callback):
    """Asks for the scoring pass's old log-probs (so the loss's ratio compares two forward passes) and records, for
    each training step, the rollout's token counts and generation time and the step's wall time and logged ratio."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._start = 0.0
        self._pending: dict[str, Any] = {}

    def rollout_fields(self, stage: str) -> set[str]:
        return {"old_logprobs"} if stage == "train" else set()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        completion_tokens = int(batch.completion_mask.sum())
        generate_s = float(batch.metrics["time/generate_s"])
        self._pending = {
            "rows": batch.num_completions,
            "completion_tokens": completion_tokens,
            "tokens": int(batch.attention_mask.sum()),
            "truncated_frac": float(batch.truncated.float().mean()),
            "generate_s": generate_s,
            "generation_tokens_per_s": completion_tokens / generate_s,
            "score_s": float(batch.metrics.get("time/score_s", float("nan"))),
            "scored_old_logprobs": batch.old_logprobs is not None,
        }
        _synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module.device)
        train_s = time.perf_counter() - self._start
        logged = {key: float(value) for key, value in trainer.logged_metrics.items() if key.startswith("train/")}
        self.steps.append(
            {
                **self._pending,
                "train_s": train_s,
                "train_tokens_per_s": self._pending["tokens"] / train_s,
                "global_step": trainer.global_step,
                "loss": logged.get("train/loss", float("nan")),
                "grad_norm": logged.get("train/grad_norm", float("nan")),
                "skipped_steps": logged.get("train/skipped_steps", float("nan")),
                "ratio_min": logged.get("train/ratio_min", float("nan")),
                "ratio_max": logged.get("train/ratio_max", float("nan")),
                "approx_kl": logged.get("train/approx_kl", float("nan")),
            }
        )


class RestoreProbe(L.Callback):
    """Compares, when training starts after a restore, the module's weights and optimizer state with ``saved`` (one
    tensor at a time, on the module's device: no second copy of the state), and a few weights with ``initial``."""

    def __init__(self, saved: dict[str, Any], initial: dict[str, torch.Tensor]) -> None:
        self.saved, self.initial = saved, initial
        self.result: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for group in ("weights", "optimizer"):
            saved = self.saved[group]
            found, equal, worst = 0, 0, 0.0
            for key, tensor in _state_tensors(pl_module, trainer, group):
                if key not in saved:
                    continue
                found += 1
                expected = saved[key].to(tensor.device)
                equal += torch.equal(tensor, expected)
                worst = max(worst, (tensor.double() - expected.double()).abs().max().item() if tensor.numel() else 0.0)
            self.result[f"{group}_saved"] = len(saved)
            self.result[f"{group}_compared"] = found
            self.result[f"{group}_equal"] = equal
            self.result[f"{group}_max_abs_diff"] = worst
        current = _probe_parameters(pl_module)
        self.result["restored_differs_from_initial"] = all(
            not torch.equal(current[name], tensor) for name, tensor in self.initial.items()
        )
        self.result["global_step_after_restore"] = trainer.global_step
        self.result["consumed_batches_after_restore"] = trainer.datamodule.consumed_batches


def _state_tensors(module: GRPOModule, trainer: L.Trainer, group: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights (``group`` ``weights``, by name) or the optimizer's state tensors (``optimizer``, as
    ``<parameter index>.<key>``), full tensors on their device."""
    if group == "weights":
        for name, tensor in module.policy.state_dict().items():
            yield name, full_tensor(tensor.detach())
        return
    for index, per_param in trainer.optimizers[0].state_dict()["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                yield f"{index}.{key}", full_tensor(value.detach())


def _training_state(module: GRPOModule, trainer: L.Trainer) -> dict[str, Any]:
    """CPU copies of the policy's weights and the optimizer's state tensors, and the step."""
    state: dict[str, Any] = {"global_step": trainer.global_step}
    for group in ("weights", "optimizer"):
        state[group] = {key: t.to("cpu", copy=True) for key, t in _state_tensors(module, trainer, group)}
    return state


def _probe_parameters(module: GRPOModule) -> dict[str, torch.Tensor]:
    """Copies of the first and last decoder layers' query weights: enough to see that a step or a restore moved
    the weights, without a full copy."""
    names = [name for name, _ in module.policy.named_parameters() if name.endswith("self_attn.q_proj.weight")]
    params = dict(module.policy.named_parameters())
    return {name: full_tensor(params[name].detach()).to("cpu", copy=True) for name in (names[0], names[-1])}


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Policy:
    model: str
    tokenizer: str


class Check:
    """The runner: builds modules, data and trainers for the plan and collects the results."""

    def __init__(self, plan: Plan, work_dir: Path, policy: Policy) -> None:
        self.plan, self.work_dir, self.policy = plan, work_dir, policy
        self.cuda = plan.accelerator == "gpu"

    def module(self, size: Size) -> GRPOModule:
        return GRPOModule(
            model=self.policy.model,
            tokenizer=self.policy.tokenizer,
            dtype="float32",  # fp32 master weights under bf16-mixed
            micro_batch_size=size.micro_batch_size,
            log_samples_every_n_steps=0,
            export_dir=None,
        )

    def data(self, size: Size) -> RolloutDataModule:
        return RolloutDataModule(
            train=ArithmeticTask("train", num_train=256, num_val=16, seed=0),
            chat="never",
            batch_size=size.prompts,
            group_size=size.group_size,
            rewards=[DIGIT_SHARE, "math_accuracy"],
            accuracy_reward="math_accuracy",
            engine="hf",
            sampling=SamplingConfig(temperature=1.0, max_new_tokens=size.max_new_tokens),
            seed=0,
        )

    def trainer(self, name: str, max_steps: int, callbacks: list[L.Callback], strategy: str = "auto") -> L.Trainer:
        plugins = [AtomicCheckpointIO()] if strategy == "auto" else []  # what lit-gcpo's CLI adds
        return L.Trainer(
            accelerator=self.plan.accelerator,
            devices=1,
            strategy=strategy,
            precision=self.plan.precision,
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(self.work_dir / name),
            plugins=plugins,
            callbacks=callbacks,
        )

    @contextlib.contextmanager
    def memory(self, record: dict[str, Any]) -> Iterator[None]:
        """Records the part's peak GPU memory (allocated and reserved by torch) and its wall time."""
        start = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            record["elapsed_s"] = time.perf_counter() - start
            if self.cuda:
                record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
                record["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------- the parts
    def rollout(self, name: str, size: Size, checkpoint: Path | None = None) -> tuple[dict[str, Any], dict | None]:
        """Trains ``size.steps`` steps; returns the record and, when ``checkpoint`` is given, the training state
        saved there."""
        record = size.record()
        saved = None
        with self.memory(record):
            L.seed_everything(0, verbose=False)
            recorder = StepRecorder()
            module, data = self.module(size), self.data(size)
            trainer = self.trainer(name, size.steps, [recorder])
            trainer.fit(module, data)
            record["steps"] = recorder.steps
            if checkpoint is not None:
                trainer.save_checkpoint(checkpoint)
                saved = _training_state(module, trainer)
                saved["consumed_batches"] = data.consumed_batches
                record["checkpoint_gib"] = checkpoint.stat().st_size / GIB
            del module, data, trainer
        self.release()
        return record, saved

    def resume(self, checkpoint: Path, saved: dict[str, Any]) -> dict[str, Any]:
        size = self.plan.resume
        record: dict[str, Any] = {"checkpoint": str(checkpoint), "saved_global_step": saved["global_step"]}
        with self.memory(record):
            L.seed_everything(0, verbose=False)
            module, data = self.module(size), self.data(size)
            probe = RestoreProbe(saved, _probe_parameters(module))
            recorder = StepRecorder()
            trainer = self.trainer("resume", saved["global_step"] + size.steps, [probe, recorder])
            trainer.fit(module, data, ckpt_path=str(checkpoint))
            record.update(probe.result)
            record["saved_consumed_batches"] = saved["consumed_batches"]
            record["global_step_after_resumed_steps"] = trainer.global_step
            record["steps"] = recorder.steps
            del module, data, trainer
        self.release()
        return record

    def fsdp2(self) -> dict[str, Any]:
        from torch.distributed.fsdp import FSDPModule

        size = self.plan.fsdp2
        record = {**size.record(), "strategy": "fsdp2", "devices": 1}
        with self.memory(record):
            L.seed_everything(0, verbose=False)
            module, data = self.module(size), self.data(size)
            before = _probe_parameters(module)
            recorder = StepRecorder()
            trainer = self.trainer("fsdp2", size.steps, [recorder], strategy="fsdp2")
            try:
                trainer.fit(module, data)
                after = _probe_parameters(module)
                record["strategy_class"] = type(trainer.strategy).__name__
                record["policy_sharded"] = isinstance(module.policy, FSDPModule)
                record["dtensor_parameters"] = sum(
                    hasattr(p, "full_tensor") for p in module.policy.parameters()
                )  # DTensors: the parameters fully_shard manages
                record["global_step"] = trainer.global_step
                record["weights_changed"] = all(not torch.equal(before[n], after[n]) for n in before)
                record["steps"] = recorder.steps
            finally:
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
            del module, data, trainer
        self.release()
        return record


# ------------------------------------------------------------------------------------------ verdicts
def _status(ok: bool) -> str:
    return "pass" if ok else "fail"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def verdict_rollout(record: dict[str, Any]) -> dict[str, Any]:
    """Generation: every step sampled tokens at a finite positive rate."""
    steps = record.get("steps", [])
    ok = len(steps) == record["steps_planned"] and all(
        s["completion_tokens"] > 0 and _finite(s["generation_tokens_per_s"]) and s["generation_tokens_per_s"] > 0
        for s in steps
    )
    last = steps[-1] if steps else {}
    return {
        "status": _status(ok),
        "max_new_tokens": record["max_new_tokens"],
        "rows": last.get("rows"),
        "completion_tokens": last.get("completion_tokens"),
        "generate_s": last.get("generate_s"),
        "tokens_per_s": last.get("generation_tokens_per_s"),
        "measured_on": "the last step (the first one of a process includes CUDA warm-up)",
    }


def verdict_training(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Training: each run took its optimizer steps, none skipped, with finite loss and a non-zero gradient."""
    sizes = []
    ok = bool(records)
    for record in records:
        steps = record.get("steps", [])
        # a step whose groups all have equal rewards has a zero gradient (the tiny policy's, now and then); a run
        # without any non-zero gradient trained nothing
        good = (
            len(steps) == record["steps_planned"]
            and all(s["skipped_steps"] == 0 and _finite(s["loss"]) and _finite(s["grad_norm"]) for s in steps)
            and any(s["grad_norm"] > 0 for s in steps)
        )
        ok = ok and good and steps[-1]["global_step"] == record["steps_planned"]
        last = steps[-1] if steps else {}
        sizes.append(
            {
                "max_new_tokens": record["max_new_tokens"],
                "micro_batch_size": record["micro_batch_size"],
                "tokens": last.get("tokens"),
                "train_s": last.get("train_s"),
                "tokens_per_s": last.get("train_tokens_per_s"),
                "grad_norm": last.get("grad_norm"),
            }
        )
    return {"status": _status(ok), "sizes": sizes, "tokens": "prompt and completion tokens of the batch"}


def verdict_ratio(record: dict[str, Any]) -> dict[str, Any]:
    """The first optimizer step's ratio exp(logp - old_logp), old log-probs from the scoring pass."""
    first = record["steps"][0]
    ends = (first["ratio_min"], first["ratio_max"])
    # (Python's max drops a NaN that comes second: a NaN ratio is an infinite deviation)
    deviation = max(abs(r - 1.0) for r in ends) if all(_finite(r) for r in ends) else math.inf
    ok = first["scored_old_logprobs"] and _finite(deviation) and deviation <= RATIO_TOLERANCE
    ok = ok and abs(first["approx_kl"]) <= RATIO_TOLERANCE
    return {
        "status": _status(ok),
        "tolerance": RATIO_TOLERANCE,
        "ratio_min": first["ratio_min"],
        "ratio_max": first["ratio_max"],
        "approx_kl": first["approx_kl"],
        "max_abs_deviation": deviation,
        "old_logprobs_from": "the scoring pass (no grad) of the rollout" if first["scored_old_logprobs"] else "none",
    }


def verdict_memory(parts: dict[str, dict[str, Any]], cuda: bool) -> dict[str, Any]:
    if not cuda:
        return {"status": "skipped", "reason": "no CUDA device (peak_rss_mib in environment is the process's)"}
    peaks = {name: part.get("peak_gpu_memory_gib") for name, part in parts.items()}
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    values = [value for value in peaks.values() if value is not None]
    peak = max(values, default=None)
    ok = peak is not None and 0 < peak <= total
    return {"status": _status(ok), "peak_gpu_memory_gib": peak, "per_part_gib": peaks, "device_total_gib": total}


def verdict_fsdp2(record: dict[str, Any]) -> dict[str, Any]:
    steps = record.get("steps", [])
    ok = (
        record.get("policy_sharded") is True
        and record.get("dtensor_parameters", 0) > 0
        and record.get("global_step") == record["steps_planned"]
        and record.get("weights_changed") is True
        and len(steps) == record["steps_planned"]
        and all(s["skipped_steps"] == 0 and _finite(s["loss"]) for s in steps)
    )
    return {"status": _status(ok), **{k: v for k, v in record.items() if k != "steps"}, "steps": steps}


def verdict_resume(record: dict[str, Any]) -> dict[str, Any]:
    """Every saved weight and optimizer tensor found again and equal, the weights not the initial ones, the loop
    and data positions restored, and the next step taken."""
    ok = all(
        record.get(f"{group}_saved", 0) > 0
        and record.get(f"{group}_compared") == record[f"{group}_saved"]
        and record.get(f"{group}_equal") == record[f"{group}_saved"]
        for group in ("weights", "optimizer")
    )
    ok = (
        ok
        and record.get("restored_differs_from_initial") is True
        and record.get("global_step_after_restore") == record["saved_global_step"]
        and record.get("consumed_batches_after_restore") == record["saved_consumed_batches"]
        and record.get("global_step_after_resumed_steps") == record["saved_global_step"] + 1
    )
    return {"status": _status(ok), **record}


# ---------------------------------------------------------------------------------------------- main
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            name: _version(name)
            for name in (
                "lit-gcpo",
                "torch",
                "lightning",
                "transformers",
                "peft",
                "sentence-transformers",
                "tensorboard",
                "jsonargparse",
                "math-verify",
                "faiss-cpu",
                "scipy",
                "datasets",
                "vllm",
            )
        },
        # what this process can import (a distribution may be installed yet hidden, or broken)
        "importable": {
            module: importlib.util.find_spec(module) is not None
            for module in ("jsonargparse", "math_verify", "faiss", "scipy", "peft", "datasets", "vllm")
        },
        "cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": properties.name, "memory_gib": properties.total_memory / GIB}
    return info


def _failed(error: BaseException) -> dict[str, Any]:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"status": "fail", "error": f"{type(error).__name__}: {error}", "traceback": "".join(lines)[-4000:]}


def prepare_policy(plan: Plan, work_dir: Path) -> tuple[Policy, dict[str, Any]]:
    """The policy the plan trains, and its description (GPU: the random Qwen2.5-Math-1.5B written to ``work_dir``)."""
    if plan.mode != "gpu":
        return Policy(TINY_MODEL_NAME, TINY_MODEL_NAME), {"architecture": f"{TINY_MODEL_NAME} (the embedded policy)"}
    built = write_random_policy(architecture_config(), work_dir, torch.device("cuda"))
    described = {"architecture": "Qwen2.5-Math-1.5B, random weights", "config": str(ARCHITECTURE_CONFIG), **built}
    return Policy(built["model"], built["tokenizer"]), described


def run(plan: Plan, work_dir: Path) -> dict[str, Any]:
    """Every part of the plan; a part that raises fails its checks and the others still run."""
    started = time.perf_counter()
    register_rewards()
    report: dict[str, Any] = {
        "mode": plan.mode,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "precision": plan.precision,
        "engine": "hf",
        "plan": asdict(plan),
        "notes": [
            "elapsed_s counts from the start of the run, after the imports",
            "the hf engine samples outside the training step's autocast: under bf16-mixed it generates with the fp32 "
            "master weights (the loss's forward passes run in bf16 autocast)",
        ],
    }
    checks: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, Any]] = {}
    try:
        policy, report["model"] = prepare_policy(plan, work_dir)
    except Exception as error:
        checks["model"] = _failed(error)
        return finish(report, checks, parts, plan, started)
    if plan.mode == "gpu":
        parameters = report["model"]["parameters"]
        checks["model"] = {"status": _status(parameters == EXPECTED_PARAMETERS), "parameters": parameters}
    check = Check(plan, work_dir, policy)
    checkpoint = work_dir / "rollout_short.ckpt"
    saved = None
    for name, size in (("rollout_short", plan.short), ("rollout_long", plan.long)):
        label = "generation_" + name.removeprefix("rollout_")
        try:
            parts[name], state = check.rollout(name, size, checkpoint if name == "rollout_short" else None)
            saved = saved or state
            checks[label] = verdict_rollout(parts[name])
        except Exception as error:
            checks[label] = _failed(error)
            check.release()
    trained = [parts[name] for name in ("rollout_short", "rollout_long") if name in parts]
    checks["training"] = verdict_training(trained) if len(trained) == 2 else {"status": "fail", "error": "a run failed"}
    first = parts.get("rollout_short", {})
    checks["on_policy_ratio"] = verdict_ratio(first) if first.get("steps") else {"status": "fail", "error": "no step"}
    try:
        if saved is None:
            raise RuntimeError("rollout_short wrote no checkpoint")
        parts["checkpoint_resume"] = check.resume(checkpoint, saved)
        checks["checkpoint_resume"] = verdict_resume(parts["checkpoint_resume"])
    except Exception as error:
        checks["checkpoint_resume"] = _failed(error)
        check.release()
    del saved
    checkpoint.unlink(missing_ok=True)
    try:
        parts["fsdp2_step"] = check.fsdp2()
        checks["fsdp2_step"] = verdict_fsdp2(parts["fsdp2_step"])
    except Exception as error:
        checks["fsdp2_step"] = _failed(error)
        check.release()
    checks["peak_memory"] = verdict_memory(parts, check.cuda)
    return finish(report, checks, parts, plan, started)


def finish(
    report: dict[str, Any], checks: dict[str, dict[str, Any]], parts: dict[str, Any], plan: Plan, started: float
) -> dict[str, Any]:
    """Adds the skipped checks, the time budget, the summary and the environment to ``report``."""
    checks["vllm_engine"] = {
        "status": "skipped",
        "reason": "needs vllm, which scripts/gpu_wheels.sh leaves out (a GPU build of several hundred MiB that pins "
        f"its own torch; installed here: {_version('vllm') or 'no'}); its GPU run is a step of its own (README)",
    }
    elapsed = time.perf_counter() - started
    checks["time_budget"] = {
        "status": _status(elapsed <= plan.time_budget_s),
        "elapsed_s": elapsed,
        "budget_s": plan.time_budget_s,
    }
    report["parts"] = parts
    report["checks"] = checks
    report["summary"] = summary(checks)
    report["elapsed_s"] = elapsed
    report["environment"] = environment()
    report["skipped"] = sorted(name for name, c in checks.items() if c["status"] == "skipped")
    report["failed"] = sorted(name for name, c in checks.items() if c["status"] == "fail")
    report["passed"] = not report["failed"]
    return report


def summary(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers, keyed by the completion limit where there are two sizes."""
    generation = {
        str(c["max_new_tokens"]): c.get("tokens_per_s")
        for name, c in checks.items()
        if name.startswith("generation_") and "max_new_tokens" in c
    }
    training = {str(s["max_new_tokens"]): s["tokens_per_s"] for s in checks.get("training", {}).get("sizes", [])}
    return {
        "generation_tokens_per_s": generation,
        "training_tokens_per_s": training,
        "peak_gpu_memory_gib": checks.get("peak_memory", {}).get("peak_gpu_memory_gib"),
        "on_policy_ratio_max_abs_deviation": checks.get("on_policy_ratio", {}).get("max_abs_deviation"),
        "checks": {name: c["status"] for name, c in checks.items()},
    }


def _plain(value: Any) -> Any:
    """``value`` with every NaN or infinite float written as a string (``"nan"``, ``"inf"``): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--cpu-smoke", action="store_true", help="the tiny policy on the CPU, small sizes")
    parser.add_argument("--work-dir", type=Path, default=None, help="model and checkpoint files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if plan.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a machine with a GPU, or use --cpu-smoke")
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    try:
        report = run(plan, work_dir)
    finally:
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["work_dir"] = str(work_dir) if args.keep else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_plain(report), indent=2, allow_nan=False, default=str) + "\n")
    statuses = ", ".join(f"{name} {c['status']}" for name, c in report["checks"].items())
    verdict = "passed" if report["passed"] else "FAILED"
    print(f"gpu_check ({plan.mode}) {verdict} in {report['elapsed_s']:.1f} s: {statuses}")
    print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
