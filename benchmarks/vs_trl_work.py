"""The work ``bench_vs_trl.py`` gives TRL's ``GRPOTrainer`` and ``lit-gcpo fit``, defined once for both.

Imported in two environments: the project's ``.venv`` (which builds the model and the prompts and the
lit-gcpo command line) and the TRL venv ``.venv-trl`` (which only needs ``sum_reward``, the paths and the
``GRPOConfig`` arguments). So the top level imports nothing beyond the standard library; lit-gcpo and
transformers are imported inside the functions that need them.

The work: a random ``LlamaForCausalLM`` with untied embeddings over a 99-token character vocabulary (printable
ASCII plus pad/bos/eos/unk), in one of two sizes (``SIZES``): ``tiny`` (hidden 128, 2 layers, 4 heads, MLP 256;
353,664 parameters; at most 32 new tokens), where per-token overhead dominates, and ``20m`` (hidden 512, 6
layers, 8 heads, MLP 1536; 20,555,264 parameters; at most 128 new tokens), where compute does; the 400 prompts
"What is A+B? Answer:" with A, B in [0, 19]; a reward of 1 when the completion contains the sum as a whole
number; 8 prompts x 8 completions per optimizer step.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
TEMPERATURE = 1.0
TOP_P = 1.0
SEED = 0


@dataclass(frozen=True)
class Size:
    """One work size: the policy's shape, the most new tokens per completion and the warm-up steps left out of a
    run's median (allocations, first calls, the reward process start)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_new_tokens: int
    warmup_steps: int
    parameters: int  # stated, checked against the built model by tests/test_bench_vs_trl.py

    @property
    def shape(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
        }


SIZES = {
    # 2 layers x (attention 4 x 128^2 + MLP 3 x 128 x 256 + two norms 2 x 128) + final norm 128
    # + embeddings and LM head 2 x 99 x 128 = 2 x 164,096 + 128 + 25,344
    "tiny": Size("tiny", 128, 2, 4, 256, max_new_tokens=32, warmup_steps=3, parameters=353_664),
    # 6 x (4 x 512^2 + 3 x 512 x 1536 + 2 x 512) + 512 + 2 x 99 x 512 = 6 x 3,408,896 + 512 + 101,376;
    # a step is ~50x the tiny one's, so one warm-up step is enough
    "20m": Size("20m", 512, 6, 8, 1536, max_new_tokens=128, warmup_steps=1, parameters=20_555_264),
}
TINY = SIZES["tiny"]
MAX_NEW_TOKENS = TINY.max_new_tokens  # the tiny size's (the default)
EXPECTED_PARAMETERS = TINY.parameters
CHARACTERS = tuple(string.printable[:95])  # digits, letters, punctuation, space: the 95 printable ASCII
REWARD_PATH = "vs_trl_work:sum_reward"  # lit-gcpo loads it by dotted path (benchmarks/ on PYTHONPATH)


@dataclass(frozen=True)
class WorkFiles:
    """Where the shared model directory and the prompt file of one benchmark run live."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "tiny-llama"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"


def prompt_rows() -> list[dict[str, str]]:
    """The 400 prompts with their gold sums (``answer``: the column both rewards receive)."""
    return [{"prompt": f"What is {a}+{b}? Answer:", "answer": str(a + b)} for a in range(20) for b in range(20)]


def sum_reward(prompts: list[str], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1 for a completion that contains the gold sum as a whole number (``12`` does not count for ``2``),
    else 0. TRL's and lit-gcpo's reward convention: one score per completion, columns as keyword lists."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else str(completion)
        scores.append(1.0 if re.search(rf"(?<!\d){re.escape(str(gold))}(?!\d)", text) else 0.0)
    return scores


def build_tokenizer() -> Any:
    """The character tokenizer (pad, bos, eos, unk, then the printable ASCII characters); adds no BOS."""
    from lit_gcpo.assets.tiny_model import SPECIAL_TOKENS, build_char_tokenizer

    return build_char_tokenizer((*SPECIAL_TOKENS, *CHARACTERS))


def build_model(seed: int = SEED, size: Size = TINY) -> Any:
    """The random policy both frameworks train (dropout is 0 in the config)."""
    from lit_gcpo.assets.tiny_model import SPECIAL_TOKENS, build_tiny_config, build_tiny_model

    config = build_tiny_config(**size.shape, vocab_tokens=(*SPECIAL_TOKENS, *CHARACTERS))
    config.tie_word_embeddings = False  # as in most released models: a separate LM head
    return build_tiny_model(config, seed=seed)


def write_work(root: Path, size: Size = TINY) -> tuple[WorkFiles, int]:
    """Save the model of ``size`` and the tokenizer (``save_pretrained``) and the prompts under ``root``; returns
    the files and the model's parameter count."""
    files = WorkFiles(Path(root))
    model = build_model(size=size)
    model.save_pretrained(files.model)
    build_tokenizer().save_pretrained(files.model)
    with open(files.prompts, "w", encoding="utf-8") as handle:
        for row in prompt_rows():
            handle.write(json.dumps(row) + "\n")
    return files, sum(p.numel() for p in model.parameters())


VLLM_OPTIONS = '{"dtype": "float32", "max_model_len": 256}'  # the fp32 work in a 256-token context


def lit_args(
    files: WorkFiles,
    beta: float,
    steps: int,
    run_dir: Path,
    max_new_tokens: int = MAX_NEW_TOKENS,
    engine: str = "hf",
    min_tokens: int = 0,
) -> list[str]:
    """``lit-gcpo fit`` arguments for the work (the subcommand included). TensorBoard scalars every step like a
    user run; no checkpoints, no exported policy, no validation, no progress bar. ``engine``: ``hf`` (what TRL is
    compared with) or ``vllm`` (``bench_wait_policy.py``). ``min_tokens``: no completion ends before it has that
    many tokens (``max_new_tokens``: the same-length control; TRL's side is ``trl_config_kwargs``'s)."""
    engine_options = ["--data.engine_options", VLLM_OPTIONS] if engine == "vllm" else []
    return [
        "fit",
        f"--seed_everything={SEED}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.max_steps={steps}",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={run_dir}",
        "--trainer.logger.name=lit",
        f"--model.model={files.model}",
        "--model.dtype=float32",
        "--model.gradient_checkpointing=false",
        "--model.disable_dropout=true",
        "--model.optimizer=torch.optim.AdamW",
        f"--model.optimizer.lr={LEARNING_RATE}",
        "--model.optimizer.weight_decay=0.0",
        "--model.warmup_steps=0",  # the default scheduler is then constant
        "--model.advantage=dr_grpo",
        "--model.loss_aggregation=seq_mean_token_sum_norm",
        f"--model.beta={beta}",
        "--model.kl_estimator=k3",
        "--model.num_iterations=1",
        "--model.micro_batch_size=0",
        f"--model.max_grad_norm={MAX_GRAD_NORM}",
        "--model.export_dir=null",
        "--data.train=lit_gcpo.data.sources.LocalFiles",
        f"--data.train.files={files.prompts}",
        "--data.template={prompt}",
        "--data.chat=never",
        "--data.required_fields=[answer]",
        f"--data.batch_size={PROMPTS_PER_STEP}",
        f"--data.group_size={GROUP_SIZE}",
        f"--data.rewards=[{REWARD_PATH}]",
        f"--data.accuracy_reward={REWARD_PATH}",
        f"--data.engine={engine}",
        *engine_options,
        f"--data.sampling.temperature={TEMPERATURE}",
        f"--data.sampling.top_p={TOP_P}",
        "--data.sampling.top_k=-1",
        f"--data.sampling.max_new_tokens={max_new_tokens}",
        f"--data.sampling.min_tokens={min_tokens}",
    ]


def trl_config_kwargs(
    beta: float, steps: int, output_dir: Path, max_new_tokens: int = MAX_NEW_TOKENS, min_tokens: int = 0
) -> dict[str, Any]:
    """``trl.GRPOConfig`` arguments for the same work (TRL 1.16 names; defaults that differ from lit-gcpo's
    or from the work are set explicitly: TRL defaults to bf16, gradient checkpointing, the DAPO loss and
    group-std scaling). ``min_tokens`` > 0: ``generation_kwargs={"min_new_tokens": min_tokens}``, which TRL 1.16
    merges into the ``GenerationConfig`` of its ``model.generate`` path; transformers then adds its
    ``MinNewTokensLengthLogitsProcessor`` over TRL's end-of-sequence ids (the logits at -inf while fewer than
    ``min_tokens`` new tokens exist: lit-gcpo's ``data.sampling.min_tokens``, vLLM's ``min_tokens``)."""
    generation = {"generation_kwargs": {"min_new_tokens": min_tokens}} if min_tokens else {}
    return {
        **generation,
        "output_dir": str(output_dir),
        "seed": SEED,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "max_steps": steps,
        "per_device_train_batch_size": PROMPTS_PER_STEP * GROUP_SIZE,  # completions per optimizer step
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,  # generation batch = the 64 completions of one step
        "num_generations": GROUP_SIZE,
        "num_iterations": 1,
        "max_completion_length": max_new_tokens,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "top_k": 0,  # 0: no top-k in TRL 1.16
        "loss_type": "dr_grpo",  # sum of token losses / (completions x max_completion_length)
        "scale_rewards": "none",  # Dr. GRPO: advantages centred on the group mean, not divided by its std
        "beta": beta,  # k3 estimator, as lit-gcpo's kl_estimator k3
        "use_bias_correction_kl": False,  # lit-gcpo's KL term is plain k3, not multiplied by the ratio
        "epsilon": 0.2,
        "learning_rate": LEARNING_RATE,
        "weight_decay": 0.0,
        "optim": "adamw_torch",  # torch.optim.AdamW, as lit-gcpo's optimizer
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": False,
        "disable_dropout": True,
        "logging_steps": 1,
        "report_to": "tensorboard",
        "log_completions": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
