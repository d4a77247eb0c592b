"""Token-distribution methods in training: the scoring pass's per-token summaries (the trainer's distribution at the
loss temperature, whatever the engine) and ``model.token_selection`` in the loss (high-entropy tokens, Clip-Cov,
KL-Cov), checked on the batches a real Trainer ran on."""

from __future__ import annotations

import math

import pytest
import torch
from test_training import CaptureBatches, _final_weights, make_pair, trainer

from lit_gcpo.algorithms.losses import grpo_loss
from lit_gcpo.algorithms.token_selection import ClipCov, HighEntropyTokens, KLCov
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.training.module import GRPOModule
from lit_gcpo.training.token_selection import GENERATOR_STEP_STRIDE


def _dense_distribution(module: GRPOModule, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, ...]:
    """``(entropy, mean log-prob)`` ``[N, L]`` of the policy's full logits at ``temperature`` (the reference)."""
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = module.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits  # [N, P + L, V]
    log_p = torch.log_softmax(logits[:, batch.prompt_length - 1 : -1].double() / temperature, -1)  # [N, L, V]
    return -(log_p.exp() * log_p).sum(-1), log_p.mean(-1)


def _group_advantages(batch: RolloutBatch) -> torch.Tensor:
    """GRPO advantages from a per-group loop (std unbiased, eps 1e-4, 0 without spread)."""
    advantages = torch.zeros_like(batch.rewards)
    for group in range(batch.num_groups):
        rows = (batch.group_ids == group).nonzero().squeeze(-1)
        r = batch.rewards[rows]
        if r.max() - r.min() > 0:
            advantages[rows] = (r - r.mean()) / (r.std() + 1e-4)
    return advantages


def test_score_rollout_gives_the_trainers_distribution_whatever_the_engine(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir, lr=0.0)
    capture = CaptureBatches(fields=())  # asks for nothing: the batch as the loss alone needs it
    trainer(tmp_path, 1, callbacks=[capture]).fit(module, data)
    batch = capture.batches[0]
    assert batch.token_entropy is None and batch.token_mean_logprob is None  # nobody asked: not computed
    # an engine with its own copy of the policy (vLLM): other log-probs, sampled at 0.7
    batch.samples_from_policy, batch.temperature = False, 0.7
    batch.engine_logprobs = torch.full_like(batch.completion_mask, -3.0)
    module.score_rollout(batch, with_reference=False, fields={"token_entropy"})
    entropy, mean_logprob = _dense_distribution(module, batch, 0.7)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.token_entropy[mask].double(), entropy[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.token_mean_logprob[mask].double(), mean_logprob[mask], atol=1e-5, rtol=0)
    assert batch.vocab_size == module.policy.get_output_embeddings().weight.shape[0]
    # at T = 1 the summaries differ: the temperature is the loss's, not a default
    assert not torch.allclose(batch.token_entropy[mask].double(), _dense_distribution(module, batch, 1.0)[0][mask])


def test_high_entropy_tokens_loss_is_the_hand_formula_on_the_batch(tiny_model_dir, tmp_path):
    """On-policy (ratio 1), token_mean: loss = -sum(m * keep * A) / sum(m), keep = entropy >= the (1 - rho)
    quantile of the batch's completion-token entropies (torch.quantile, linear: TRL's rule); the normaliser
    keeps every token."""
    module, data = make_pair(tiny_model_dir, lr=0.0, token_selection=HighEntropyTokens(rho=0.25))
    capture = CaptureBatches(fields=())
    run = trainer(tmp_path, 1, callbacks=[capture], log_every_n_steps=1)
    run.fit(module, data)
    batch = capture.batches[0]
    mask = batch.completion_mask
    entropy, _ = _dense_distribution(module, batch, batch.logprob_temperature)  # the loss asked for it
    torch.testing.assert_close(batch.token_entropy[mask > 0].double(), entropy[mask > 0], atol=1e-5, rtol=0)
    threshold = torch.quantile(batch.token_entropy[mask > 0].float(), 0.75)
    keep = (batch.token_entropy >= threshold) & (mask > 0)  # [N, L]
    advantages = _group_advantages(batch)
    expected = -(mask * keep * advantages[:, None]).sum() / mask.sum()
    grpo_value = -(mask * advantages[:, None]).sum() / mask.sum()
    assert float(run.logged_metrics["train/loss"]) == pytest.approx(float(expected), abs=1e-6)
    assert abs(float(expected) - float(grpo_value)) > 1e-4  # the mask changed the loss: the test can fail
    assert float(run.logged_metrics["train/entropy_threshold"]) == pytest.approx(float(threshold), abs=1e-6)
    kept = float(keep.sum() / (mask > 0).sum())
    assert float(run.logged_metrics["train/high_entropy_frac"]) == pytest.approx(kept, abs=1e-6)
    assert 0.2 < kept < 0.35  # about rho, ties and interpolation aside


def test_clip_cov_detaches_the_seeded_share_in_training(tiny_model_dir, tmp_path):
    """A band wide enough that every token is eligible: Clip-Cov detaches max(1, int(ratio * tokens)) tokens
    chosen by a generator seeded with seed * GENERATOR_STEP_STRIDE + step (documented), so the on-policy loss
    is -sum(m * keep * A) / sum(m) with that keep, and the update differs from GRPO's."""
    options = ClipCov(ratio=0.3, lb=-1e9, ub=1e9, seed=5)
    module, data = make_pair(tiny_model_dir, lr=0.0, token_selection=options)
    capture = CaptureBatches(fields=())
    run = trainer(tmp_path, 1, callbacks=[capture], log_every_n_steps=1)
    run.fit(module, data)
    batch = capture.batches[0]
    mask = batch.completion_mask
    tokens = int(mask.sum())
    chosen_count = max(1, int(0.3 * tokens))
    generator = torch.Generator().manual_seed(5 * GENERATOR_STEP_STRIDE + 0)
    eligible = (mask > 0).flatten().nonzero().squeeze(-1)  # every mask token, row-major
    order = torch.randperm(eligible.numel(), generator=generator)
    keep = torch.ones(mask.numel())
    keep[eligible[order[:chosen_count]]] = 0.0
    keep = keep.view_as(mask)
    advantages = _group_advantages(batch)
    expected = -(mask * keep * advantages[:, None]).sum() / mask.sum()
    assert float(run.logged_metrics["train/loss"]) == pytest.approx(float(expected), abs=1e-6)
    assert float(run.logged_metrics["train/clip_cov_frac"]) == pytest.approx(chosen_count / tokens, abs=1e-6)
    assert float(run.logged_metrics["train/clip_cov_eligible_frac"]) == pytest.approx(1.0, abs=1e-6)


def test_kl_cov_penalises_the_top_share_and_trains(tiny_model_dir, tmp_path):
    """Two optimizer steps per rollout: at the first the policy is the generating one (|log-ratio| = 0, no
    penalty), at the second it has moved; the logged share of penalised tokens is max(1, int(ratio * T)) / T at
    both, the mean |log-ratio| is half the second step's (the mean over the two), and the weights move."""
    module, data = make_pair(tiny_model_dir, lr=0.5, token_selection=KLCov(ratio=0.2, coef=1.0), num_iterations=2)
    before = _final_weights(module)
    capture = CaptureBatches(fields=())
    run = trainer(tmp_path, 1, callbacks=[capture], log_every_n_steps=1)
    run.fit(module, data)
    mask = capture.batches[0].completion_mask
    tokens = int(mask.sum())
    assert float(run.logged_metrics["train/kl_cov_frac"]) == pytest.approx(max(1, int(0.2 * tokens)) / tokens, abs=1e-6)
    assert float(run.logged_metrics["train/kl_cov_abs_kl"]) > 1e-4
    assert math.isfinite(float(run.logged_metrics["train/loss"]))
    assert any(not torch.equal(before[n], p) for n, p in _final_weights(module).items())


def test_token_penalty_and_weights_compose_by_hand():
    # One completion, A = 1, ratios exp(logp - old) = [1, 2, 0.5], unclipped (KL-Cov's surrogate): pg = -A r =
    # [-1, -2, -0.5]; penalty [0, 0.3, 0]; is_weights [1, 0.5, 1] multiply pg + penalty (verl's order):
    # token_mean = (-1 + (-2 + 0.3) * 0.5 - 0.5) / 3 = -2.35 / 3.
    logp = torch.tensor([[0.0, math.log(2.0), math.log(0.5)]], requires_grad=True)
    loss, metrics = grpo_loss(
        logp,
        torch.zeros(1, 3),
        torch.ones(1),
        torch.ones(1, 3),
        eps_low=math.inf,
        eps_high=math.inf,
        is_weights=torch.tensor([[1.0, 0.5, 1.0]]),
        token_penalty=torch.tensor([[0.0, 0.3, 0.0]]),
    )
    assert float(loss) == pytest.approx(-2.35 / 3, abs=1e-6)
    assert float(metrics["policy_loss"]) == pytest.approx(-2.35 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="token_penalty must share one"):
        grpo_loss(logp, torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3), token_penalty=torch.zeros(1, 2))
