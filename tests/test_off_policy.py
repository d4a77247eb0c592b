"""One-step-off-policy rollouts (``data.off_policy``, ``lit_gcpo.data.off_policy``) through real fits on the tiny
policy: which weights sampled each batch (regenerated independently), the behaviour log-probs and the corrected loss
against a hand computation, exact resume with the in-flight batch saved, and the options refused at construction.
"""

from __future__ import annotations

import time
import zlib

import lightning as L
import pytest
import torch
from test_training import trainer as make_trainer

from lit_gcpo.algorithms.advantages import group_advantages
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.data.streams import PromptStream
from lit_gcpo.engines import build_engine
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.rewards import RewardSet
from lit_gcpo.tasks.arithmetic import ArithmeticTask
from lit_gcpo.training.module import GRPOModule
from lit_gcpo.training.policy import load_policy, load_tokenizer

pytestmark = pytest.mark.slow

B, G, SEED, STEPS = 3, 4, 3, 4
C_MIN, C_MAX = 0.5, 2.0  # sequence_mask bounds (stale sequences on both sides of them are checked below)
REWARDS = ["toy_rewards:digit_fraction"]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6)


def _task() -> ArithmeticTask:
    return ArithmeticTask("train", num_train=64, num_val=8, seed=1)


class Record(L.Callback):
    """Keeps, at every step, the policy's weights before its optimizer step, the batch, the logged loss and when the
    step started and ended (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.val_batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        weights = {name: value.detach().clone() for name, value in pl_module.policy.state_dict().items()}
        self.steps.append({"step": trainer.global_step, "weights": weights, "batch": batch})
        self.steps[-1]["start"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["loss"] = float(trainer.callback_metrics["train/loss"])
        self.steps[-1]["end"] = time.perf_counter()


def fit(
    model_dir: str,
    root,
    max_steps: int,
    ckpt=None,
    save=None,
    validate: bool = False,
    data_options=None,
    **module_options,
):
    L.seed_everything(0)
    correction = {"rollout_correction": "sequence_mask", "rollout_correction_min": C_MIN}
    correction["rollout_correction_max"] = C_MAX
    module = GRPOModule(
        model=model_dir,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        max_grad_norm=0.0,
        log_samples_every_n_steps=0,
        export_dir=None,
        **{**correction, **module_options},
    )
    data = RolloutDataModule(
        train=_task(),
        batch_size=B,
        group_size=G,
        rewards=REWARDS,
        accuracy_reward=None,
        sampling=SAMPLING,
        seed=SEED,
        off_policy=True,
        val=ArithmeticTask("validation", num_train=64, num_val=8, seed=1) if validate else None,
        **(data_options or {}),
    )
    record = Record()
    evaluation = {"val_check_interval": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0} if validate else {}
    trainer = make_trainer(root, max_steps, log_every_n_steps=1, callbacks=[record], **evaluation)
    trainer.fit(module, data, ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return record, module


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    return fit(tiny_model_dir, tmp_path_factory.mktemp("off-policy"), STEPS)


def _policy_with(model_dir: str, weights: dict) -> torch.nn.Module:
    policy = load_policy(model_dir)
    policy.load_state_dict(weights)
    return policy.eval()


@torch.no_grad()
def _token_logprobs(policy: torch.nn.Module, batch) -> torch.Tensor:
    """``[N, L]`` log-probs of the completion tokens, by a plain forward over the whole padded rows."""
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = policy(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits.float()
    length = batch.completion_mask.shape[1]
    scores = torch.log_softmax(logits[:, -length - 1 : -1] / SAMPLING.temperature, dim=-1)  # [N, L, V]
    tokens = batch.input_ids[:, -length:]
    return scores.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * batch.completion_mask  # [N, L]


def test_each_batch_is_sampled_with_the_weights_one_step_before(tiny_model_dir, straight):
    """Step 0's batch is sampled with w_0 (nothing in flight), step t's with w_{t-1}: regenerating stream position t
    with a plain engine over a fresh policy holding w_{t-1} (each prompt's seed from its position, README) gives the
    batch's tokens and engine log-probs; the trainer's old log-probs are those of w_t."""
    record, _ = straight
    steps = record.steps
    assert [s["step"] for s in steps] == list(range(STEPS))
    versions = [s["batch"].metrics["rollout/weight_version"] for s in steps]
    assert versions == [0, 0, 1, 2]
    assert [s["batch"].metrics["rollout/weight_lag"] for s in steps] == [0, 1, 1, 1]
    rows = _task().load()
    stream = PromptStream(rows, [row["prompt"] for row in rows], batch_size=B, seed=SEED, start=lambda: 0)
    tokenizer, rewards = load_tokenizer(tiny_model_dir), RewardSet.from_names(REWARDS)
    for t, step in enumerate(steps):
        batch = step["batch"]
        assert not batch.samples_from_policy
        policy = _policy_with(tiny_model_dir, steps[int(versions[t])]["weights"])
        collector = RolloutCollector(build_engine("hf", policy, tokenizer), tokenizer, rewards)
        prompts = stream.batch(t)
        seeds = [zlib.crc32(f"{SEED}/train/{position}".encode()) for position in prompts.positions]
        again = collector.collect(prompts, G, SAMPLING, torch.device("cpu"), seeds=seeds)
        assert torch.equal(again.input_ids, batch.input_ids), t
        torch.testing.assert_close(again.engine_logprobs, batch.engine_logprobs, atol=1e-6, rtol=0)
        current = _token_logprobs(_policy_with(tiny_model_dir, step["weights"]), batch)
        old = batch.old_logprobs * batch.completion_mask  # the trainer's values on padding are never read
        torch.testing.assert_close(old, current, atol=1e-5, rtol=0)
        gap = (old - batch.engine_logprobs).abs().max()
        assert (gap < 1e-5) if t == 0 else (gap > 1e-3), (t, gap)  # stale after step 0: not vacuous


def test_the_loss_corrects_trainer_against_engine_with_sequence_mask(tiny_model_dir, straight):
    """Hand computation of each step's loss from the recorded batch: rho_i = exp(sum_t (old_t - engine_t)) over the
    completion tokens, weight rho_i where C_min <= rho_i <= C_max, else 0 (``sequence_mask``); one iteration, so the
    PPO ratio is 1 and the token_mean loss is -sum_i,t A_i w_i / tokens (beta 0, no entropy term)."""
    record, _ = straight
    masked = kept = 0
    for step in record.steps[1:]:
        batch = step["batch"]
        mask = batch.completion_mask  # [N, L]
        log_rho = ((batch.old_logprobs - batch.engine_logprobs) * mask).sum(-1)  # [N]
        rho = log_rho.exp()
        weight = torch.where((rho >= C_MIN) & (rho <= C_MAX), rho, torch.zeros_like(rho))  # [N]
        advantages, _ = group_advantages(batch.rewards, batch.group_ids, batch.num_groups)  # [N]
        expected = -(advantages * weight * mask.sum(-1)).sum() / mask.sum()
        assert step["loss"] == pytest.approx(float(expected), abs=1e-6)
        masked += int((weight == 0).sum())
        kept += int(((weight != 0) & (log_rho.abs() > 1e-4)).sum())
    assert masked > 0 and kept > 0  # both branches of the mask were taken


def test_resume_with_the_in_flight_batch_saved_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, straight):
    """Stop after 2 steps (the checkpoint holds batch 2, sampled with w_1), resume to 4: the batches of steps 2
    and 3 and the final weights are bit-equal to the uninterrupted run's."""
    record, module = straight
    checkpoint = str(tmp_path / "stopped.ckpt")
    fit(tiny_model_dir, tmp_path / "first", 2, save=checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["RolloutDataModule"]["off_policy_in_flight"]
    assert saved["position"] == 2 and saved["weight_version"] == 1
    resumed, resumed_module = fit(tiny_model_dir, tmp_path / "second", STEPS, ckpt=checkpoint)
    assert [s["step"] for s in resumed.steps] == [2, 3]
    for ours, theirs in zip(resumed.steps, record.steps[2:], strict=True):
        assert torch.equal(ours["batch"].input_ids, theirs["batch"].input_ids)
        assert torch.equal(ours["batch"].engine_logprobs, theirs["batch"].engine_logprobs)
        assert ours["batch"].metrics["rollout/weight_version"] == theirs["batch"].metrics["rollout/weight_version"]
        assert ours["loss"] == theirs["loss"]
    for name, value in module.policy.state_dict().items():
        assert torch.equal(resumed_module.policy.state_dict()[name], value), name


def test_validation_between_steps_leaves_the_training_batches_alone(tiny_model_dir, tmp_path, straight):
    """Validation after every step (it waits for the in-flight batch, then samples with the live policy and the
    shared rewards): the 3 training batches are bit-equal to those of the run without validation."""
    record, _ = straight
    validated, _ = fit(tiny_model_dir, tmp_path, 3, validate=True)
    assert validated.val_batches == 3
    for ours, theirs in zip(validated.steps, record.steps[:3], strict=True):
        assert torch.equal(ours["batch"].input_ids, theirs["batch"].input_ids)
        assert torch.equal(ours["batch"].engine_logprobs, theirs["batch"].engine_logprobs)
        assert ours["loss"] == theirs["loss"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"dynamic_sampling": {"max_rounds": 2}}, "dynamic_sampling"),
        ({"engine": "vllm", "engine_options": {"sync_every": 2}}, r"engine_options\.sync_every 2.*every step"),
        ({"engine": "vllm", "engine_options": {"enable_sleep_mode": True}}, r"engine_options\.enable_sleep_mode"),
    ],
)
def test_off_policy_refuses_what_it_does_not_support_yet(options, words):
    with pytest.raises(ValueError, match=words):
        RolloutDataModule(train=_task(), off_policy=True, **options)


def test_off_policy_with_the_vllm_engine_is_accepted_with_a_sync_at_every_step():
    """The vllm engine is no longer refused (its fits are in tests/vllm_engine/test_vllm_off_policy.py); sync_every
    1 is what it runs with anyway, and the same options without off_policy keep sync_every 2."""
    data = RolloutDataModule(train=_task(), off_policy=True, engine="vllm", engine_options={"sync_every": 1})
    assert (data.off_policy, data.engine_name, data.engine_options.sync_every) == (True, "vllm", 1)
    lagging = RolloutDataModule(train=_task(), engine="vllm", engine_options={"sync_every": 2})
    assert lagging.engine_options.for_engine("vllm") == {"sync_every": 2}


def test_off_policy_without_a_rollout_correction_is_refused_at_setup(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data\.off_policy needs model\.rollout_correction"):
        fit(tiny_model_dir, tmp_path, 1, rollout_correction=None)


def test_the_cli_parses_the_option_documents_it_and_refuses_bad_values(monkeypatch, capsys):
    from pathlib import Path

    from lit_gcpo.running.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    config = ["--config", "configs/quickstart.yaml"]
    assert main([*config, "--data.off_policy", "true"], run=False).datamodule.off_policy is True
    assert main(config, run=False).datamodule.off_policy is False  # off by default
    with pytest.raises(SystemExit):
        main(["fit", *config, "--data.off_policy", "sometimes"])
    assert "data.off_policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--data.off_policy" in help_text and "one-step-off-policy rollouts" in help_text


def test_a_resume_that_turns_off_policy_on_or_off_is_printed():
    """Turned on: the first step samples its own batch; turned off: the saved in-flight batch is not used and its
    position is sampled with the current weights. Either way the run continues from the same data position."""
    from lit_gcpo.running.resume import compare_with_checkpoint

    checkpoint = {"RolloutDataModule": RolloutDataModule(off_policy=True).state_dict()}
    assert checkpoint["RolloutDataModule"]["off_policy"] is True
    assert compare_with_checkpoint(checkpoint, {"data": {"off_policy": True}}) == ([], [])
    assert compare_with_checkpoint(checkpoint, {"data": {"off_policy": False}})[1] == [
        "data.off_policy: False (the checkpoint has True)"
    ]
