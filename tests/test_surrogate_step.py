"""A surrogate in a training step (``LossStep``): the rollout correction of another engine's batch multiplies CISPO's
and SAPO's token loss and enters VESPO's sequence weight, the token selection's keep mask multiplies all of them,
with the old log-probs of a scoring pass or, one iteration per rollout, of the loss pass itself (deferred), and
split into micro-batches the step's loss and gradient are the whole batch's."""

from __future__ import annotations

import pytest
import torch

from lit_gcpo.algorithms.losses import aggregate_loss
from lit_gcpo.algorithms.rollout_correction import rollout_correction_weights
from lit_gcpo.algorithms.surrogate_options import CISPO, SAPO, VESPO
from lit_gcpo.algorithms.surrogates import cispo_loss, sapo_loss, vespo_loss
from lit_gcpo.algorithms.token_selection import HighEntropyTokens, high_entropy_mask
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.training.loss_step import LossStep
from lit_gcpo.training.token_selection import LossTokenSelection

N, L = 6, 5


def _loss_step(surrogate, mode: str = "token_truncate") -> LossStep:
    return LossStep(
        advantage="grpo", advantage_scale="group", loss_aggregation="token_mean", eps_low=0.2, eps_high=0.2,
        dual_clip=None, ratio_level="token", rollout_correction=mode, rollout_correction_min=0.5,
        rollout_correction_max=2.0, off_policy_mask_threshold=None, beta=0.0, kl_estimator="k3", entropy_coef=0.0,
        num_iterations=1, mask_truncated_completions=False, surrogate=surrogate,
        selection=LossTokenSelection(HighEntropyTokens(rho=0.5)),
    )  # fmt: skip


def _batch(with_old: bool) -> tuple[RolloutBatch, torch.Tensor]:
    """Two groups of three from another engine (vLLM-like), and the current log-probs ``[N, L]``."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1])
    mask = (torch.arange(L) < lengths[:, None]).float()  # [N, L]
    old = -torch.rand(N, L, generator=gen) * 2  # [N, L]
    engine = old + torch.randn(N, L, generator=gen) * 0.5  # ratios e^{+-0.5}: some outside [0.5, 2]
    current = old + torch.randn(N, L, generator=gen) * 0.4
    batch = RolloutBatch(
        prompts=["1+1=", "2+2="], rows=[{}, {}], completions=["c"] * N,
        input_ids=torch.ones(N, 2 + L, dtype=torch.long), attention_mask=torch.ones(N, 2 + L, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]), rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        engine_logprobs=engine, old_logprobs=old if with_old else None, samples_from_policy=False,
        token_entropy=torch.rand(N, L, generator=gen),
    )  # fmt: skip
    return batch, current if with_old else old


def _step(loss_step: LossStep, batch: RolloutBatch, current: torch.Tensor, micro: list[slice]):
    plan, _ = loss_step.plan(batch, lambda tensor, op: tensor, logs_this_step=False)
    logp = current.clone().requires_grad_(True)
    total = sum(loss_step.micro_batch_loss(batch, rows, logp[rows], None, plan)[0] for rows in micro)
    (grad,) = torch.autograd.grad(total, logp)
    return total, grad, plan


@pytest.mark.parametrize("with_old", [True, False], ids=["scored", "deferred"])
@pytest.mark.parametrize("surrogate", [CISPO(max_ratio=1.3), SAPO(tau_pos=2.0, tau_neg=3.0), VESPO()])
def test_correction_and_keep_reach_the_surrogate(surrogate, with_old):
    batch, current = _batch(with_old)
    loss_step = _loss_step(surrogate)
    whole, whole_grad, plan = _step(loss_step, batch, current, [slice(0, N)])
    # the expected loss, from the pure functions: the engine's correction of the generating policy's log-probs
    # (the batch's old ones, or the loss pass's own when deferred), the high-entropy keep mask of the step
    old = batch.old_logprobs if with_old else current
    correction, _ = rollout_correction_weights(old, batch.engine_logprobs, batch.completion_mask, "token_truncate",
                                               0.5, 2.0)  # fmt: skip
    assert (correction != 1).any() and ((correction == 0.5) | (correction == 2.0)).any()  # truncated somewhere
    keep, _ = high_entropy_mask(batch.token_entropy, batch.completion_mask, 0.5)
    keep = keep.float()
    logp = current.clone().requires_grad_(True)
    args = (logp, old, plan.advantages, batch.completion_mask)
    if isinstance(surrogate, VESPO):
        token_loss, _ = vespo_loss(*args, **surrogate.options(), is_weights=keep, correction=correction)
    else:
        fn = cispo_loss if isinstance(surrogate, CISPO) else sapo_loss
        token_loss, _ = fn(*args, **surrogate.options(), is_weights=keep * correction)
    expected = aggregate_loss(token_loss, batch.completion_mask)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert whole.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(whole_grad, expected_grad, rtol=1e-6, atol=1e-8)
    # three micro-batches add up to the whole batch (deferred: each one's correction from its own rows)
    parts, parts_grad, _ = _step(loss_step, batch, current, [slice(0, 2), slice(2, 5), slice(5, N)])
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(parts_grad, whole_grad, rtol=1e-6, atol=1e-8)


def test_vespo_sees_a_token_the_correction_masks():
    # token_mask sets a token's correction to 0: for VESPO its log-weight is log 1e-8 in the sum, so phi of that
    # completion is ~0 (k_pos = 2: phi ~ e^3 (1e-8)^2), while the clipped surrogate drops the token alone.
    batch, current = _batch(with_old=True)
    correction, _ = rollout_correction_weights(batch.old_logprobs, batch.engine_logprobs, batch.completion_mask,
                                               "token_mask", 0.5, 2.0)  # fmt: skip
    hit = ((correction == 0) & (batch.completion_mask > 0)).any(-1)  # [N]
    assert hit.any() and not hit.all()
    loss_step = _loss_step(VESPO(), mode="token_mask")
    plan, _ = loss_step.plan(batch, lambda tensor, op: tensor, logs_this_step=False)
    _, metrics = loss_step.micro_batch_loss(batch, slice(0, N), current, None, plan)
    assert metrics["vespo_phi_min"].item() < 1e-12
    logp = current.clone().requires_grad_(True)
    loss, _ = loss_step.micro_batch_loss(batch, slice(0, N), logp, None, plan)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[hit].abs().max().item() < 1e-12  # every token of a completion with a masked token
    assert grad[~hit].abs().max().item() > 1e-3
