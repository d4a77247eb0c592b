"""Writes ``reference.json``: TRL 1.16's own ``GRPOTrainer._compute_loss`` (its loss and d loss / d log-probs) for
``loss_type`` ``cispo``, ``sapo``, ``luspo`` and ``vespo`` on the hand-made inputs below, for
``tests/test_surrogates_trl.py`` to compare lit-gcpo's losses with.

Run with the Python of an environment that has trl 1.16.0 (not a dependency of lit-gcpo), from anywhere::

    /work/wt/issue-23-speed/.venv-trl/bin/python tests/assets/trl_losses/make_reference.py

How TRL is driven: a ``GRPOTrainer`` made without ``__init__`` (no model, no dataset), carrying only the attributes
``_compute_loss`` reads; its log-prob pass returns ``CURRENT`` (a leaf tensor, whose gradient is recorded), so the loss
is TRL's code from the log-probs on: importance ratio, the loss type's token loss, the rollout correction's ratio,
and the loss type's aggregation (one process, one accumulation step, ``steps_per_generation`` 1, beta 0). The rollout
correction's ratio, computed by TRL in ``_generate_and_score_completions`` (not callable alone), is computed here as
TRL computes it for ``token_truncate`` / ``token_mask`` (exp of the masked log-ratio of old to engine log-probs,
clamped to, or zeroed outside, [C_min, C_max]); lit-gcpo's equality to TRL's own block is
``tests/test_rollout_correction.py::test_equals_trl_1_16``, and the test here checks lit-gcpo's ratio against the one
stored.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import GRPOTrainer

# 5 completions, 5 token columns; 0 = padding, whose log-probs hold finite garbage (TRL's padded positions are the
# log-probs of pad tokens: real numbers) that must not reach the loss.
MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
OLD = [
    [-0.7, -1.2, -0.3, -2.0, -0.9],
    [-0.5, -1.6, -0.8, -3.0, -3.0],
    [-1.1, -0.2, -2.4, -0.6, -5.0],
    [-0.4, -0.9, -1.0, -1.0, -1.0],
    [-1.5, -0.6, -0.2, -2.0, -2.0],
]
# log(current / old) per token: inside and outside every clip range used below (e^0.3 = 1.35, e^1.2 = 3.32,
# e^2 = 7.39 above CISPO's cap 5, e^-1 = 0.37), and large values on padding.
LOG_RATIO = [
    [0.05, 0.3, -0.4, 1.2, 2.0],
    [-1.0, 0.1, 0.25, 9.0, -9.0],
    [0.02, -0.15, 1.6, -0.3, 7.0],
    [2.0, -0.6, 4.0, 4.0, 4.0],
    [0.0, 0.4, -0.2, 6.0, 6.0],
]
ADVANTAGES = [1.0, -0.8, 0.5, -1.5, 0.0]
# the engine's log-probs (the rollout correction's denominator): old - delta
ENGINE_GAP = [
    [0.1, -0.5, 1.2, 0.0, 0.0],
    [-0.9, 0.3, 0.05, 0.0, 0.0],
    [0.6, -1.0, 0.2, 0.4, 0.0],
    [0.2, 0.1, 0.0, 0.0, 0.0],
    [-0.3, 0.7, -0.2, 0.0, 0.0],
]
CORRECTION_BOUNDS = (0.5, 2.5)

# (name, GRPOConfig fields, rollout correction mode or None)
CASES = [
    ("cispo_cap5", {"loss_type": "cispo", "epsilon_high": 5.0}, None),
    ("cispo_cap1.5", {"loss_type": "cispo", "epsilon_high": 1.5}, None),
    ("cispo_cap5_token_truncate", {"loss_type": "cispo", "epsilon_high": 5.0}, "token_truncate"),
    ("sapo_token", {"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}, None),
    ("sapo_token_t2_t4", {"loss_type": "sapo", "sapo_temperature_pos": 2.0, "sapo_temperature_neg": 4.0}, None),
    (
        "sapo_sequence",
        {"loss_type": "sapo", "importance_sampling_level": "sequence", "sapo_temperature_pos": 1.0,
         "sapo_temperature_neg": 1.05},
        None,
    ),
    ("luspo_eps0.2_0.28", {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon_high": 0.28}, None),
    (
        "luspo_gspo_range",
        {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        None,
    ),
    ("vespo_defaults", {"loss_type": "vespo"}, None),
    (
        "vespo_k1_l0.5_k4_l6",
        {"loss_type": "vespo", "vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0,
         "vespo_lambda_neg": 6.0},
        None,
    ),
    ("vespo_token_truncate", {"loss_type": "vespo"}, "token_truncate"),
    ("vespo_token_mask", {"loss_type": "vespo"}, "token_mask"),
]  # fmt: skip

DEFAULTS = {
    "epsilon": 0.2,
    "epsilon_high": None,
    "importance_sampling_level": "token",
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
}


class OneProcess:
    """The accelerator of one process: reductions and gathers are the identity."""

    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def correction_ratio(mode: str) -> torch.Tensor:
    """TRL's ``importance_sampling_ratio`` for a token mode (see the module docstring)."""
    mask = torch.tensor(MASK, dtype=torch.float32)
    old = torch.tensor(OLD)
    engine = old - torch.tensor(ENGINE_GAP)
    ratio = torch.exp((old - engine) * mask)
    low, high = CORRECTION_BOUNDS
    if mode == "token_truncate":
        return torch.clamp(ratio, min=low, max=high)
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def trl_loss(fields: dict, correction: str | None) -> tuple[float, list[list[float]]]:
    config = {**DEFAULTS, **fields}
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    current = (torch.tensor(OLD) + torch.tensor(LOG_RATIO)).requires_grad_(True)
    mask = torch.tensor(MASK, dtype=torch.int64)
    n, length = mask.shape
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (current, torch.zeros(n, length), None)
    trainer.args = SimpleNamespace(
        delta=None,
        use_bias_correction_kl=False,
        steps_per_generation=1,
        **{key: config[key] for key in DEFAULTS if key.startswith(("sapo", "vespo"))},
    )
    trainer.loss_type = config["loss_type"]
    trainer.epsilon_low = config["epsilon"]
    trainer.epsilon_high = config["epsilon_high"] if config["epsilon_high"] is not None else config["epsilon"]
    trainer.importance_sampling_level = config["importance_sampling_level"]
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.beta = 0.0
    trainer.use_vllm = correction is not None
    trainer.vllm_importance_sampling_correction = correction is not None
    trainer.vllm_importance_sampling_mode = correction
    trainer.max_completion_length = length
    trainer.current_gradient_accumulation_steps = 1
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.accelerator = OneProcess()
    trainer.model = SimpleNamespace(training=True)
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.int64),
        "prompt_mask": torch.ones(n, 1, dtype=torch.int64),
        "completion_ids": torch.zeros(n, length, dtype=torch.int64),
        "completion_mask": mask,
        "advantages": torch.tensor(ADVANTAGES),
        "old_per_token_logps": torch.tensor(OLD),
        "num_items_in_batch": mask.sum().float(),
    }
    if correction is not None:
        inputs["importance_sampling_ratio"] = correction_ratio(correction)
    loss = trainer._compute_loss(None, inputs)
    (grad,) = torch.autograd.grad(loss, current)
    return loss.item(), grad.tolist()


def main() -> None:
    cases = []
    for name, fields, correction in CASES:
        loss, grad = trl_loss(fields, correction)
        config = {**DEFAULTS, **fields}
        cases.append({"name": name, "config": config, "correction": correction, "loss": loss, "grad": grad})
    reference = {
        "about": (
            "TRL's GRPOTrainer._compute_loss on the inputs below, written by tests/assets/trl_losses/make_reference.py "
            "(read its docstring for how TRL is driven); 'config' holds the GRPOConfig fields, 'correction' the "
            "vllm_importance_sampling_mode (C_min, C_max = correction_bounds), 'grad' is d loss / d current log-probs"
        ),
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "inputs": {
            "mask": MASK,
            "old_logp": OLD,
            "log_ratio": LOG_RATIO,
            "advantages": ADVANTAGES,
            "engine_gap": ENGINE_GAP,
            "correction_bounds": list(CORRECTION_BOUNDS),
            "correction_ratio": {mode: correction_ratio(mode).tolist() for mode in ("token_truncate", "token_mask")},
        },
        "cases": cases,
    }
    path = Path(__file__).with_name("reference.json")
    text = json.dumps(reference, indent=1)
    text = re.sub(r"\[\s*([-+0-9.e,\s]+?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)  # rows
    path.write_text(text + "\n")
    print(f"wrote {path}: {len(cases)} cases, trl {trl.__version__}")


if __name__ == "__main__":
    main()
