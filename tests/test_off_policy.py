"""One-step-off-policy rollouts (``data.off_policy``, ``lit_gcpo.data.off_policy``) through real fits on the tiny
policy: which weights sampled each batch (regenerated independently), the behaviour log-probs and the corrected loss
against a hand computation, exact resume with the in-flight batch saved, and the options refused at construction.
"""

from __future__ import annotations

import threading
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
    """Keeps, at every step, the policy's weights before its optimizer step, the batch, the logged loss and rollout-
    correction metrics, the gradients the optimizer step got, the policy's forward passes so far (the scoring pass
    runs when ``score_old`` asks for the old log-probs; the engine's copy of the policy is not counted; the prompts'
    forward of a shared prompt pass, ``lit_gcpo.training.shared_prompts``, is part of its pass), and when the
    step started and ended (``time.perf_counter``)."""

    def __init__(self, score_old: bool = False) -> None:
        self.steps: list[dict] = []
        self.val_batches = 0
        self.score_old, self.forwards = score_old, 0

    def rollout_fields(self, stage: str) -> set[str]:
        return {"old_logprobs"} if self.score_old and stage == "train" else set()

    def on_train_start(self, trainer, pl_module) -> None:  # after the DataModule copied the policy for its engine
        pl_module.policy.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() > 0:  # a shared prompt pass fills an empty cache: part of its pass
            self.forwards += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        weights = {name: value.detach().clone() for name, value in pl_module.policy.state_dict().items()}
        self.steps.append({"step": trainer.global_step, "weights": weights, "batch": batch})
        self.steps[-1]["start"] = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps[-1]["loss"] = float(logged["train/loss"])
        kept = ("train/correction_", "train/mismatch_")
        self.steps[-1]["correction"] = {k: float(v) for k, v in logged.items() if k.startswith(kept)}
        self.steps[-1]["forwards"] = self.forwards
        self.steps[-1]["end"] = time.perf_counter()


def fit(
    model_dir: str,
    root,
    max_steps: int,
    ckpt=None,
    save=None,
    validate: bool = False,
    score_old: bool = False,
    data_options: dict | None = None,
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
        accuracy_reward=None,
        sampling=SAMPLING,
        seed=SEED,
        off_policy=True,
        val=ArithmeticTask("validation", num_train=64, num_val=8, seed=1) if validate else None,
        **{"rewards": REWARDS, **(data_options or {})},
    )
    record = Record(score_old)
    evaluation = {"val_check_interval": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0} if validate else {}
    trainer = make_trainer(root, max_steps, log_every_n_steps=1, callbacks=[record], **evaluation)
    trainer.fit(module, data, ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return record, module


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    return fit(tiny_model_dir, tmp_path_factory.mktemp("off-policy"), STEPS)


@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory):
    """The same run with a callback that reads the old log-probs: the scoring pass runs before each step."""
    return fit(tiny_model_dir, tmp_path_factory.mktemp("off-policy-scored"), STEPS, score_old=True)


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
    batch's tokens and engine log-probs, which differ from those of w_t after step 0."""
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
        gap = (current - batch.engine_logprobs).abs().max()
        assert (gap < 1e-5) if t == 0 else (gap > 1e-3), (t, gap)  # stale after step 0: not vacuous
    # the trainer's wait for each batch: at step 0 nothing was in flight, so it includes the whole generation
    first = steps[0]["batch"].metrics
    assert first["time/rollout_wait_s"] >= first["time/generate_s"] > 0
    assert all(step["batch"].metrics["time/rollout_wait_s"] >= 0 for step in steps[1:])


def test_the_loss_corrects_trainer_against_engine_with_sequence_mask(tiny_model_dir, straight):
    """Hand computation of each step's loss from the recorded batch and weights: the trainer's log-probs old_t of
    w_t by a plain forward, rho_i = exp(sum_t (old_t - engine_t)) over the completion tokens, weight rho_i where
    C_min <= rho_i <= C_max, else 0 (``sequence_mask``); one iteration, so the PPO ratio is 1 and the token_mean
    loss is -sum_i,t A_i w_i / tokens (beta 0, no entropy term). No scoring pass ran: the batch has no old
    log-probs, the loss took them from its own forward."""
    record, _ = straight
    masked = kept = 0
    for step in record.steps[1:]:
        batch = step["batch"]
        assert batch.old_logprobs is None
        mask = batch.completion_mask  # [N, L]
        old = _token_logprobs(_policy_with(tiny_model_dir, step["weights"]), batch)  # [N, L]
        log_rho = ((old - batch.engine_logprobs) * mask).sum(-1)  # [N]
        rho = log_rho.exp()
        weight = torch.where((rho >= C_MIN) & (rho <= C_MAX), rho, torch.zeros_like(rho))  # [N]
        advantages, _ = group_advantages(batch.rewards, batch.group_ids, batch.num_groups)  # [N]
        expected = -(advantages * weight * mask.sum(-1)).sum() / mask.sum()
        assert step["loss"] == pytest.approx(float(expected), abs=1e-5)
        masked += int((weight == 0).sum())
        kept += int(((weight != 0) & (log_rho.abs() > 1e-4)).sum())
        masked_frac = float((weight == 0).float().mean())  # sequences outside [C_min, C_max]
        assert step["correction"]["train/correction_masked_seq_frac"] == pytest.approx(masked_frac)
    assert masked > 0 and kept > 0  # both branches of the mask were taken


def test_without_a_scoring_pass_loss_gradients_and_metrics_equal_the_scored_run(straight, scored):
    """One iteration per rollout: the loss's own forward gives the old log-probs, and the rollout correction is
    computed per micro-batch from them. Against the run whose scoring pass filled ``old_logprobs`` first (weights
    computed over the whole batch in the plan): every step's loss, every gradient and the correction's metrics agree
    within 1e-6, and the policy ran one forward pass per step instead of two."""
    lean, _ = straight
    full, _ = scored
    for t, (ours, theirs) in enumerate(zip(lean.steps, full.steps, strict=True)):
        assert ours["batch"].old_logprobs is None and theirs["batch"].old_logprobs is not None
        assert torch.equal(ours["batch"].input_ids, theirs["batch"].input_ids), t
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        for name, grad in theirs["grads"].items():
            torch.testing.assert_close(ours["grads"][name], grad, atol=1e-6, rtol=0, msg=f"step {t}: {name}")
        assert ours["correction"].keys() == theirs["correction"].keys() and len(ours["correction"]) == 7
        for key, value in theirs["correction"].items():
            assert ours["correction"][key] == pytest.approx(value, abs=1e-6), (t, key)
    assert any(abs(g).max() > 1e-3 for g in lean.steps[-1]["grads"].values())  # not vacuous: it trained
    per_step = [step["forwards"] for step in lean.steps]  # forward passes so far, after each step
    scored_per_step = [step["forwards"] for step in full.steps]
    assert per_step == list(range(1, STEPS + 1)) and scored_per_step == list(range(2, 2 * STEPS + 1, 2))


def test_resume_with_the_in_flight_batch_saved_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, straight):
    """Stop after 2 steps (the checkpoint holds batch 2, sampled with w_1), resume to 4: the batches of steps 2
    and 3 and the final weights are bit-equal to the uninterrupted run's."""
    record, module = straight
    checkpoint = str(tmp_path / "stopped.ckpt")
    fit(tiny_model_dir, tmp_path / "first", 2, save=checkpoint)
    (saved,) = torch.load(checkpoint, weights_only=True)["RolloutDataModule"]["off_policy_in_flight"]  # one rank's
    assert saved["position"] == 2 and saved["weight_version"] == 1 and saved["drawn"] == 1
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
        (
            {"engine": "vllm", "dynamic_sampling": {"max_rounds": 2}},
            r"data\.off_policy with data\.engine vllm works without data\.dynamic_sampling",
        ),
        ({"engine": "vllm", "engine_options": {"sync_every": 2}}, r"engine_options\.sync_every 2.*every step"),
        ({"engine": "vllm", "engine_options": {"enable_sleep_mode": True}}, r"engine_options\.enable_sleep_mode"),
        ({"engine_options": {"decode_threads": 1}}, r"engine_options\.decode_threads 1: with data\.off_policy"),
    ],
)
def test_off_policy_refuses_what_it_does_not_support_yet(options, words):
    with pytest.raises(ValueError, match=words):
        RolloutDataModule(train=_task(), off_policy=True, **options)
    data = RolloutDataModule(train=_task(), off_policy=True, dynamic_sampling={"max_rounds": 2})  # hf: supported
    assert data.off_policy and data.dynamic_sampling.max_rounds == 2


def test_the_worker_never_sets_the_process_thread_count(tiny_model_dir, tmp_path, monkeypatch):
    """torch's thread count is the process's: the worker samples while the trainer steps, so only the main thread's
    sampling (the fit's first batch; a small policy samples on one thread) may set it, and restores it."""
    calls: list[tuple[str, int]] = []
    original, before = torch.set_num_threads, torch.get_num_threads()

    def spy(count: int) -> None:
        calls.append((threading.current_thread().name, count))
        original(count)

    original(2)
    monkeypatch.setattr(torch, "set_num_threads", spy)
    try:
        record, _ = fit(tiny_model_dir, tmp_path, 3)
    finally:
        original(before)
    assert [step["batch"].metrics["rollout/weight_lag"] for step in record.steps] == [0.0, 1.0, 1.0]  # the worker ran
    assert [count for name, count in calls if name == "MainThread"][:2] == [1, 2]  # the first batch: set, restored
    assert [name for name, _ in calls if name != "MainThread"] == []


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
