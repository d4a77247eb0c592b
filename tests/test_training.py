"""End-to-end behaviour of GRPOModule + RolloutDataModule in a real Trainer on the CPU."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_gcpo.data.batch import OPTIONAL_FIELDS, RolloutBatch
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.module import GRPOModule


def make_pair(
    model_dir: str,
    *,
    lr: float = 1e-2,
    micro_batch_size: int = 0,
    rewards=None,
    optimizer=None,
    val: bool = False,
    **module_kwargs,
):
    def sgd(params):
        return torch.optim.SGD(params, lr=lr)

    module = GRPOModule(
        model=model_dir,
        optimizer=optimizer or sgd,
        micro_batch_size=micro_batch_size,
        max_grad_norm=0.0,
        log_samples_every_n_steps=0,
        export_dir=None,
        **module_kwargs,
    )
    data = RolloutDataModule(
        train=ArithmeticTask("train", num_train=64, num_val=8, seed=1),
        val=ArithmeticTask("validation", num_train=64, num_val=8, seed=1) if val else None,
        batch_size=3,
        group_size=4,
        rewards=rewards or ["toy_rewards:digit_fraction"],
        accuracy_reward=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
        seed=3,
    )
    return module, data


def trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class CaptureBatches(L.Callback):
    """Keeps every training batch; it asks for every optional field (``fields``: which ones it declares)."""

    def __init__(self, fields: tuple[str, ...] = OPTIONAL_FIELDS) -> None:
        self.batches: list[RolloutBatch] = []
        self.fields = set(fields)

    def rollout_fields(self, stage: str) -> set[str]:
        return self.fields

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)


def test_one_step_changes_every_trainable_parameter(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer(tmp_path, 1).fit(module, data)
    unchanged = [n for n, p in module.policy.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []


def test_logged_loss_equals_hand_formula_on_policy(tiny_model_dir, tmp_path):
    """On-policy (ratio 1), no KL, token_mean: loss = -sum(m * A) / sum(m), A from a per-group loop."""
    module, data = make_pair(tiny_model_dir, lr=0.0)
    capture = CaptureBatches()
    run = trainer(tmp_path, 1, callbacks=[capture])
    run.fit(module, data)
    batch = capture.batches[0]
    expected_adv = torch.zeros_like(batch.rewards)
    for g in range(batch.num_groups):
        rows = (batch.group_ids == g).nonzero().squeeze(-1)
        r = batch.rewards[rows]
        if r.max() - r.min() > 0:
            expected_adv[rows] = (r - r.mean()) / (r.std() + 1e-4)
    mask = batch.completion_mask
    expected = -(mask * expected_adv[:, None]).sum() / mask.sum()
    assert float(run.logged_metrics["train/loss"]) == pytest.approx(float(expected), abs=1e-6)
    assert float(expected) != 0.0  # the toy reward gives the groups a spread


def test_trainer_logprobs_equal_full_log_softmax_and_engine(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir, lr=0.0)
    capture = CaptureBatches()
    trainer(tmp_path, 1, callbacks=[capture]).fit(module, data)
    batch = capture.batches[0]
    full = full_log_softmax(module, batch)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.old_logprobs[mask], full[mask], atol=1e-5, rtol=0)
    # the hf engine's sampled-token log-probs are those of the same distribution
    torch.testing.assert_close(batch.engine_logprobs[mask], full[mask], atol=1e-4, rtol=0)
    # the answer clusters computed alongside the scoring pass are those of the answers
    from lit_gcpo.algorithms.clustering import answer_clusters

    assert torch.equal(batch.answer_clusters, answer_clusters(batch.answers, batch.group_ids))


def full_log_softmax(module: GRPOModule, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """``[N, L]`` the policy's log-probs of the batch's completion tokens, from its full logits at ``temperature``."""
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = module.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits  # [N, P + L, V]
    p = batch.prompt_length
    scaled = torch.log_softmax(logits[:, p - 1 : -1].float() / temperature, -1)  # [N, L, V]
    return scaled.gather(-1, batch.completion_ids.unsqueeze(-1))[..., 0]  # [N, L]


def _final_weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def test_micro_batches_give_the_same_update(tiny_model_dir, tmp_path):
    results, logged = [], []
    for micro in (0, 5):
        L.seed_everything(0)
        module, data = make_pair(tiny_model_dir, lr=0.5, micro_batch_size=micro)
        run = trainer(tmp_path / str(micro), 1, log_every_n_steps=1)  # entropy is computed on logged steps
        run.fit(module, data)
        results.append(_final_weights(module))
        logged.append({k: float(run.logged_metrics[f"train/{k}"]) for k in ("loss", "policy_loss", "entropy")})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=0, msg=name)
    for key, value in logged[0].items():  # metrics merged over micro-batches equal the whole batch's
        assert logged[1][key] == pytest.approx(value, abs=1e-6), key


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    def adam(params):
        return torch.optim.AdamW(params, lr=1e-3)

    L.seed_everything(0)
    module, data = make_pair(tiny_model_dir, optimizer=adam, warmup_steps=4)
    trainer(tmp_path / "straight", 6).fit(module, data)
    straight = _final_weights(module)

    L.seed_everything(0)
    module, data = make_pair(tiny_model_dir, optimizer=adam, warmup_steps=4)
    first = trainer(tmp_path / "a", 3)
    first.fit(module, data)
    ckpt = tmp_path / "three.ckpt"
    first.save_checkpoint(ckpt)
    assert data.consumed_batches == 3

    L.seed_everything(123)  # a different global RNG must not matter
    module, data = make_pair(tiny_model_dir, optimizer=adam, warmup_steps=4)
    trainer(tmp_path / "b", 6).fit(module, data, ckpt_path=str(ckpt))
    assert data.consumed_batches == 6
    resumed = _final_weights(module)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)


def _poison_training_passes(monkeypatch, count: float) -> None:
    """Make the first ``count`` gradient-enabled log-prob passes NaN (the scoring pass is no-grad)."""
    original = GRPOModule.completion_logprobs
    state = {"left": count}

    def poisoned(self, *args, **kwargs):
        logprobs, entropy, hidden = original(self, *args, **kwargs)
        if torch.is_grad_enabled() and state["left"] > 0:
            state["left"] -= 1
            logprobs = logprobs + float("nan")
        return logprobs, entropy, hidden

    monkeypatch.setattr(GRPOModule, "completion_logprobs", poisoned)


def test_nonfinite_loss_skips_the_step(tiny_model_dir, tmp_path, monkeypatch):
    module, data = make_pair(tiny_model_dir, lr=1e-2)
    before = _final_weights(module)
    _poison_training_passes(monkeypatch, 2)
    run = trainer(tmp_path, 1)
    run.fit(module, data)
    assert module.skipped_steps == 2
    assert run.global_step == 1 and data.consumed_batches == 3  # two rollouts skipped, the third trained
    after = _final_weights(module)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)


def test_persistent_nonfinite_loss_stops_with_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    module, data = make_pair(tiny_model_dir, lr=1e-2, max_consecutive_skips=3)
    before = _final_weights(module)
    _poison_training_passes(monkeypatch, math.inf)
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite loss"):
        trainer(tmp_path, 5).fit(module, data)
    assert all(torch.equal(v, before[n]) for n, v in _final_weights(module).items())


def test_validation_reward_equals_independent_greedy_decoding(tiny_model_dir, tmp_path):
    """val/reward_mean equals greedy decoding of each prompt alone (no padding) scored by hand."""
    from toy_rewards import digit_fraction
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, data = make_pair(tiny_model_dir, lr=0.0, val=True)
    data.val_batch_size = 3  # several batches, uneven last one
    run = trainer(tmp_path, 1, limit_val_batches=None)
    run.validate(module, data)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = ArithmeticTask("validation", num_train=64, num_val=8, seed=1).load()
    scores = []
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        scores += digit_fraction([row["prompt"]], [text])
    expected = sum(scores) / len(scores)
    assert float(run.logged_metrics["val/reward_mean"]) == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < 1  # the comparison is not between two trivial values


def test_lora_policy_uses_adapters_for_reference_and_exports_merged_weights(tiny_model_dir, tmp_path):
    from lit_gcpo.training.policy import LoraOptions

    module, data = make_pair(tiny_model_dir, lr=0.05, beta=0.1, lora=LoraOptions(r=4, alpha=8))
    assert module.reference is None  # the base model with adapters disabled is the reference
    capture = CaptureBatches()
    trainer(tmp_path, 2, callbacks=[capture]).fit(module, data)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the reference log-probs are the frozen base model's: equal in both steps, unlike the policy's
    second = capture.batches[1]
    base = make_pair(tiny_model_dir)[0]
    with torch.no_grad():
        ref, _, _ = base.completion_logprobs(second.input_ids, second.attention_mask, second.completion_mask.shape[1])
    mask = second.completion_mask.bool()
    torch.testing.assert_close(second.ref_logprobs[mask], ref[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(second.old_logprobs[mask], ref[mask], atol=1e-4)
    # exported weights (what a rollout engine receives) equal peft's own merge
    exported = dict(module.export_weights())
    merged = module.policy.merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(exported[name], value, atol=1e-6, rtol=0, msg=name)


class RecordLearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_default_schedule_decays_to_the_floor_at_max_steps(tiny_model_dir, tmp_path, decay):
    module, data = make_pair(tiny_model_dir, lr=0.01, warmup_steps=1, lr_decay=decay, min_lr_ratio=0.2)
    record = RecordLearningRates()
    trainer(tmp_path, 5, callbacks=[record]).fit(module, data)
    # warm-up 1 step, then from 1 at step 1 to the floor 0.2 at step 5: progress 0, 1/4, 2/4, 3/4
    shape = [1.0, 0.75, 0.5, 0.25] if decay == "linear" else [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    expected = [0.01] + [0.01 * (0.2 + 0.8 * s) for s in shape]
    assert record.lrs == pytest.approx(expected, rel=1e-9)


def test_a_decay_without_max_steps_names_the_option(tiny_model_dir, tmp_path):
    module, data = make_pair(tiny_model_dir, lr_decay="cosine")
    with pytest.raises(ValueError, match=r"model.lr_decay 'cosine' decays to trainer.max_steps"):
        trainer(tmp_path, -1, max_epochs=1).fit(module, data)
