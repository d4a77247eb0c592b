"""bf16-mixed is on-policy exact, the reference follows the precision, settings the module cannot honour are
refused before training, and temperature / L_max have one source (the batch carries them)."""

from __future__ import annotations

import pytest
import torch
from test_training import CaptureBatches, _final_weights, full_log_softmax, make_pair, trainer

from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.training.parallel import unsupported_option


class CaptureLossMetrics(CaptureBatches):
    """Keeps the batch, and the ratio metrics of the first iteration from the logged values."""


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_first_iteration_ratio_is_exactly_one(tiny_model_dir, tmp_path, precision):
    """The scoring pass runs under the training step's precision context and micro-batches: on the first
    iteration new and old log-probs are the same computation, so every token's ratio is 1 and k3 is 0.
    (Scoring outside autocast, as before, gave ratios up to 0.15 from 1 under bf16-mixed.)"""
    module, data = make_pair(tiny_model_dir, lr=1e-2, micro_batch_size=5, num_iterations=1)
    # a callback that reads old_logprobs makes the scoring pass run (on-policy it is skipped otherwise)
    run = trainer(tmp_path, 2, precision=precision, callbacks=[CaptureBatches()], log_every_n_steps=1)
    run.fit(module, data)
    logged = run.logged_metrics
    assert float(logged["train/ratio_min"]) == pytest.approx(1.0, abs=1e-6)
    assert float(logged["train/ratio_max"]) == pytest.approx(1.0, abs=1e-6)
    assert float(logged["train/approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(logged["train/clip_frac_low"]) == 0.0 and float(logged["train/clip_frac_high"]) == 0.0
    assert float(logged["train/grad_norm"]) > 0  # it did train


@pytest.mark.parametrize(("precision", "compute_dtype"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_training_forward_computes_in_the_trainers_precision(tiny_model_dir, tmp_path, precision, compute_dtype):
    """The trainer's precision decides what the training step computes in: under bf16-mixed every linear layer
    of the loss's forward pass (the only one with gradients on: generation and scoring run without) outputs
    bf16 while the master weights stay fp32 and still learn. Ignoring the precision would leave fp32 outputs."""
    module, data = make_pair(tiny_model_dir, lr=1e-2)
    dtypes: set[torch.dtype] = set()
    linear = next(m for m in module.policy.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype) if torch.is_grad_enabled() else None)
    before = _final_weights(module)
    run = trainer(tmp_path, 2, precision=precision)
    run.fit(module, data)
    after = _final_weights(module)
    assert dtypes == {compute_dtype}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())  # master weights
    assert module.skipped_steps == 0 and any(not torch.equal(after[n], before[n]) for n in after)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_the_hf_engine_samples_from_the_distribution_the_scoring_pass_computes(tiny_model_dir, tmp_path, precision):
    """The hf engine records each sampled token's log-prob under the distribution it samples from. It sampled with
    the fp32 weights outside autocast while the scoring and training passes ran under bf16 autocast: per-token gaps
    up to 0.084 (mean 0.018) on this policy, with the batch claiming ``samples_from_policy`` (so no rollout
    correction). Sampling in the trainer's precision context, the on-policy ratio exp(old - engine) is 1 within
    1e-5 on every token (measured: 0 under bf16-mixed and bf16-true, up to 3.4e-6 in fp32, where the KV-cached
    one-token steps and the full forward add in other orders). The batch's embeddings are gathered while sampling:
    under bf16-true the engine's buffers keep their dtype (Lightning's context makes bf16 the default)."""
    module, data = make_pair(tiny_model_dir, lr=0.0, num_iterations=1)
    capture = CaptureBatches()
    trainer(tmp_path, 2, precision=precision, callbacks=[capture]).fit(module, data)
    assert len(capture.batches) == 2
    for batch in capture.batches:
        assert batch.samples_from_policy and batch.engine_logprobs is not None
        mask = batch.completion_mask.bool()
        ratio = torch.exp(batch.old_logprobs - batch.engine_logprobs)[mask]  # [tokens]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_scoring_outside_the_precision_context_is_detected(tiny_model_dir, tmp_path, monkeypatch):
    """The planted bug (scoring without autocast) makes the ratio differ from 1 under bf16-mixed."""
    from lit_gcpo.training.module import GRPOModule

    monkeypatch.setattr(GRPOModule, "precision_context", lambda self: torch.autocast("cpu", enabled=False))
    module, data = make_pair(tiny_model_dir, lr=0.0, num_iterations=1)
    run = trainer(tmp_path, 1, precision="bf16-mixed", callbacks=[CaptureBatches()])
    run.fit(module, data)
    spread = max(
        abs(float(run.logged_metrics["train/ratio_min"]) - 1), abs(float(run.logged_metrics["train/ratio_max"]) - 1)
    )
    assert spread > 1e-3


@pytest.mark.parametrize(
    ("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16)]
)
def test_reference_follows_precision_and_equals_policy_at_step_zero(tiny_model_dir, tmp_path, precision, dtype):
    module, data = make_pair(tiny_model_dir, lr=1e-2, beta=0.04)
    capture = CaptureBatches()
    run = trainer(tmp_path, 1, precision=precision, callbacks=[capture])
    run.fit(module, data)
    assert module.reference.dtype == dtype
    assert module.reference.device == run.strategy.root_device
    assert not any(k.startswith("reference") or "._reference" in k for k in module.state_dict())
    batch = capture.batches[0]
    mask = batch.completion_mask.bool()
    gap = (batch.ref_logprobs - batch.old_logprobs)[mask].abs().max().item()
    # bf16-mixed: autocast computes each linear layer from a bf16 cast of the policy's fp32 weight, which is
    # exactly what the reference holds, so the numbers are the same there too
    assert gap < 1e-6
    layers = module.reference.model.get_decoder().layers
    linear = [p for m in layers.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    assert all(p.dtype == dtype for p in linear)
    held = sum(p.numel() * p.element_size() for p in module.reference.model.parameters())
    fp32 = sum(p.numel() * 4 for p in module.reference.model.parameters())
    if dtype == torch.bfloat16:
        assert held < 0.6 * fp32  # the linear layers are the bulk of a decoder
    else:
        assert held == fp32


@pytest.mark.parametrize(
    ("strategy", "precision", "names"),
    [
        ("deepspeed_stage_2", "bf16-mixed", ["deepspeed", "fsdp2"]),
        ("deepspeed", "32-true", ["deepspeed", "fsdp2"]),
        ("fsdp", "32-true", ["FSDP1", "fsdp2"]),
        ("ddp", "16-mixed", ["trainer.precision 16-mixed", "bf16-mixed"]),
        ("auto", "16-true", ["trainer.precision 16-true", "bf16-mixed"]),
    ],
)
def test_unsupported_strategy_or_precision_is_named(strategy, precision, names):
    reason = unsupported_option(strategy, precision)
    assert reason is not None and all(name in reason for name in names)


@pytest.mark.parametrize(
    ("strategy", "precision"), [("ddp", "bf16-mixed"), ("fsdp2", "32-true"), ("auto", "bf16-true")]
)
def test_supported_options_pass(strategy, precision):
    assert unsupported_option(strategy, precision) is None


def test_module_refuses_unsupported_precision_in_setup(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir)
    # (on a CPU Lightning itself turns 16-mixed into bf16-mixed; 16-true reaches the module as asked)
    with pytest.raises(ValueError, match=r"trainer\.precision 16-true"):
        trainer(tmp_path, 1, precision="16-true").fit(module, data)


@pytest.mark.parametrize(("temperature", "scored_at"), [(0.7, 0.7), (0.0, 1.0)])
def test_log_probs_use_the_sampling_temperature_the_batch_carries(tiny_model_dir, tmp_path, temperature, scored_at):
    """One source, data.sampling: each batch carries how it was sampled, and the trainer's log-probs are those of
    log_softmax(logits / T) with T the sampling temperature (1 for greedy sampling, temperature 0)."""
    module, data = make_pair(tiny_model_dir, lr=0.0)
    data.sampling = SamplingConfig(temperature=temperature, max_new_tokens=6)
    capture = CaptureBatches()
    trainer(tmp_path, 1, callbacks=[capture]).fit(module, data)
    batch = capture.batches[0]
    assert (batch.temperature, batch.max_new_tokens, batch.samples_from_policy) == (temperature, 6, True)
    expected = full_log_softmax(module, batch, scored_at)  # [N, L]
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.old_logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(batch.old_logprobs[mask], expected[mask] * 2, atol=1e-3)  # a loose tolerance cannot pass
