"""CISPO, SAPO, LUSPO and VESPO equal TRL 1.16's own ``GRPOTrainer._compute_loss``: the loss and its gradient with
respect to the log-probs, on the inputs and TRL settings stored in ``tests/assets/trl_losses/reference.json``
(written by ``make_reference.py`` beside it, run in an environment with trl 1.16.0; the file says how)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_gcpo.algorithms.losses import grpo_loss
from lit_gcpo.algorithms.rollout_correction import rollout_correction_weights
from lit_gcpo.algorithms.surrogate_options import CISPO, SAPO, VESPO, surrogate_problem

REFERENCE = json.loads((Path(__file__).parent / "assets" / "trl_losses" / "reference.json").read_text())
INPUTS = {key: value for key, value in REFERENCE["inputs"].items() if not isinstance(value, dict)}
MASK = torch.tensor(INPUTS["mask"], dtype=torch.float32)
OLD = torch.tensor(INPUTS["old_logp"])
CURRENT = OLD + torch.tensor(INPUTS["log_ratio"])
ADV = torch.tensor(INPUTS["advantages"])
ENGINE = OLD - torch.tensor(INPUTS["engine_gap"])

# TRL's aggregation of each loss type, in lit-gcpo's names
AGGREGATION = {
    "cispo": "token_mean",
    "vespo": "token_mean",
    "sapo": "seq_mean_token_mean",
    "luspo": "seq_mean_token_sum",
}


def _lit_gcpo_settings(config: dict, correction: str | None) -> dict:
    """lit-gcpo's module options for TRL's ``GRPOConfig`` fields ``config``."""
    loss_type = config["loss_type"]
    eps_high = config["epsilon_high"] if config["epsilon_high"] is not None else config["epsilon"]
    surrogate = {
        "cispo": lambda: CISPO(max_ratio=eps_high),
        "sapo": lambda: SAPO(tau_pos=config["sapo_temperature_pos"], tau_neg=config["sapo_temperature_neg"]),
        "vespo": lambda: VESPO(*(config[f"vespo_{name}"] for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"))),
        "luspo": lambda: None,
    }[loss_type]()
    return {
        "surrogate": surrogate,
        "ratio_level": config["importance_sampling_level"],
        "eps_low": config["epsilon"],
        "eps_high": eps_high,
        "aggregation": AGGREGATION[loss_type],
        "correction": correction,
    }


def test_the_reference_was_made_by_trl_1_16():
    assert REFERENCE["trl_version"] == "1.16.0"
    assert {case["config"]["loss_type"] for case in REFERENCE["cases"]} == {"cispo", "sapo", "luspo", "vespo"}


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_the_stored_correction_ratio_is_lit_gcpos(mode):
    weights, _ = rollout_correction_weights(OLD, ENGINE, MASK, mode, *INPUTS["correction_bounds"])
    torch.testing.assert_close(weights, torch.tensor(REFERENCE["inputs"]["correction_ratio"][mode]))


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["name"])
def test_loss_and_gradient_equal_trls(case):
    settings = _lit_gcpo_settings(case["config"], case["correction"])
    surrogate = settings["surrogate"]
    # the settings are a combination lit-gcpo accepts (TRL's own warnings are refusals here)
    assert (
        surrogate_problem(surrogate, settings["ratio_level"], None, settings["correction"], settings["aggregation"])
        is None
    )
    correction = None
    if case["correction"] is not None:
        correction, _ = rollout_correction_weights(OLD, ENGINE, MASK, case["correction"], *INPUTS["correction_bounds"])
    logp = CURRENT.clone().requires_grad_(True)
    loss, _ = grpo_loss(
        logp,
        OLD,
        ADV,
        MASK,
        surrogate="clip" if surrogate is None else surrogate.name,
        surrogate_options=None if surrogate is None else surrogate.options(),
        eps_low=settings["eps_low"],
        eps_high=settings["eps_high"],
        ratio_level=settings["ratio_level"],
        correction=correction,
        aggregation=settings["aggregation"],
    )
    assert loss.item() == pytest.approx(case["loss"], rel=1e-6, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor(case["grad"]), rtol=1e-6, atol=1e-7)
