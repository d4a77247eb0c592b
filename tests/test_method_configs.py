"""Every ``configs/methods/<name>.yaml`` trains the embedded task through ``lit-gcpo fit`` (two small steps), and the
method's own quantity, logged or written into the batch, has the value its formula gives on the trained batch."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_gcpo.running.cli import main
from lit_gcpo.training.policy import load_policy

REPO = Path(__file__).parents[1]
METHOD_CONFIGS = sorted((REPO / "configs" / "methods").glob("*.yaml"))
METHODS = ["cispo", "clip_cov", "empo", "gcpo", "grpo", "high_entropy_tokens", "kl_cov", "luspo", "rent", "sapo",
           "seed_grpo", "self_certainty", "ttrl", "vespo"]  # fmt: skip


class LastBatch(L.Callback):
    """Keeps the last training batch (after the uncertainty callback wrote its weights: it runs first)."""

    batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LastBatch.batch = batch


class LastBatchWithOldLogprobs(LastBatch):
    """``LastBatch`` that asks for the old log-probs (a scoring pass; with one iteration per rollout and the policy's
    own samples they equal the loss pass's log-probs), for checking a surrogate's loss on the trained batch."""

    def rollout_fields(self, stage: str) -> set[str]:
        return {"old_logprobs"} if stage == "train" else set()


def test_every_method_has_a_config():
    assert [path.stem for path in METHOD_CONFIGS] == METHODS


def _resolved(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for index, item in enumerate(value) for k, v in _flat(item, f"{prefix}{index}.").items()}
    return {prefix[:-1]: value}


OWN_SETTINGS = {
    "grpo": ("trainer.callbacks.0.",),
    "seed_grpo": ("trainer.callbacks.0.", "model.advantage"),
    "gcpo": (),
    "ttrl": ("trainer.callbacks.0.", "data.label_free", "data.rewards"),
    "empo": ("trainer.callbacks.0.", "data.label_free", "data.rewards"),
    "self_certainty": ("trainer.callbacks.0.", "data.label_free", "data.rewards"),
    "rent": ("trainer.callbacks.0.", "data.label_free", "data.rewards"),
    "high_entropy_tokens": ("trainer.callbacks.0.", "model.token_selection"),
    "clip_cov": ("trainer.callbacks.0.", "model.token_selection"),
    "kl_cov": ("trainer.callbacks.0.", "model.token_selection"),
    "cispo": ("trainer.callbacks.0.", "model.surrogate"),
    "sapo": ("trainer.callbacks.0.", "model.surrogate"),
    "vespo": ("trainer.callbacks.0.", "model.surrogate"),
    "luspo": ("trainer.callbacks.0.", "model.loss_aggregation", "model.ratio_level", "model.eps_low", "model.eps_high"),
}


def test_method_configs_differ_from_the_quickstart_only_in_the_method(capsys, monkeypatch):
    """Equal footing: every resolved setting is the quickstart's but the method's own and where the run writes."""
    monkeypatch.chdir(REPO)
    quickstart = _flat(_resolved(REPO / "configs" / "quickstart.yaml", capsys))
    for config in METHOD_CONFIGS:
        resolved = _flat(_resolved(config, capsys))
        own = (*OWN_SETTINGS[config.stem], "trainer.default_root_dir", "trainer.logger.")
        differing = {key for key in quickstart.keys() | resolved.keys() if quickstart.get(key) != resolved.get(key)}
        assert {key for key in differing if not key.startswith(own)} == set(), config.stem
        assert resolved["trainer.logger.init_args.name"] == config.stem


def _fit(config: Path, root: Path, recorder: str = "LastBatch"):
    return main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+", f"test_method_configs.{recorder}",
            "--data.batch_size", "6",
            "--data.group_size", "4",
            "--data.val.init_args.num_val", "8",
            "--data.val_batch_size", "8",
            "--model.warmup_steps", "0",
            "--model.lr_decay", "constant",
            "--model.export_dir", "null",
        ]
    )  # fmt: skip


def _row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean of each row's mask tokens, by a plain loop."""
    return torch.tensor(
        [float(sum(v for v, m in zip(row, keep, strict=True) if m > 0) / max(float(keep.sum()), 1)) for row, keep in
         zip(values.double().tolist(), mask, strict=True)]
    )  # fmt: skip


def _majority_loop(batch) -> torch.Tensor:
    """TTRL by a plain loop: 1 where the completion's answer cluster has the most votes of its group (ties: the
    cluster seen first); unanswered completions neither vote nor score."""
    expected = torch.zeros(batch.num_completions)
    for group in range(batch.num_groups):
        members = [i for i in range(batch.num_completions) if int(batch.group_ids[i]) == group]
        votes: dict[int, list[int]] = {}
        for i in members:
            if batch.answers[i] is not None:
                votes.setdefault(int(batch.answer_clusters[i]), []).append(i)
        if votes:
            winner = max(votes, key=lambda c: (len(votes[c]), -votes[c][0]))
            for i in votes[winner]:
                expected[i] = 1.0
    return expected


def _check_method(name: str, batch, logged: dict[str, float]) -> None:
    mask = batch.completion_mask.cpu()
    tokens = float(mask.sum())
    if name in (
        "grpo",
        "high_entropy_tokens",
        "clip_cov",
        "kl_cov",
        "ttrl",
        "empo",
        "self_certainty",
        "rent",
        *SURROGATES,
    ):
        assert torch.equal(batch.advantage_weights, torch.ones_like(batch.advantage_weights))  # w = 1
    if name == "seed_grpo":  # w = 1 / (1 + 0.0417 SE_n), SE_n in [0, 1]
        assert float(batch.advantage_weights.min()) >= 1 / 1.0417 - 1e-6 and float(batch.advantage_weights.max()) <= 1
    if name == "gcpo":  # normalised to mean 1 over the groups with reward spread
        spread = [g for g in range(batch.num_groups) if float(batch.rewards[batch.group_ids == g].std()) > 0]
        if spread:
            weights = [float(batch.advantage_weights[batch.group_ids == g][0]) for g in spread]
            assert sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-5)
    if name == "ttrl":
        torch.testing.assert_close(batch.rewards.cpu(), _majority_loop(batch))
        assert logged["reward/ttrl_mean"] == pytest.approx(float(_majority_loop(batch).mean()), abs=1e-6)
    if name == "empo":  # the share of the group in the completion's cluster (0 unanswered), in the band (0, 1)
        expected = torch.zeros(batch.num_completions)
        for i in range(batch.num_completions):
            group = batch.group_ids == batch.group_ids[i]
            same = (batch.answer_clusters == batch.answer_clusters[i]) & group
            share = float(same.sum() / group.sum()) if batch.answers[i] is not None else 0.0
            clusters = batch.answer_clusters[group]
            p = torch.bincount(clusters).double() / clusters.numel()
            se_n = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(clusters.numel()))
            expected[i] = share if 1e-12 < se_n < 1 - 1e-12 else 0.0
        torch.testing.assert_close(batch.rewards.cpu(), expected, atol=1e-6, rtol=0, check_dtype=False)
    if name == "self_certainty":  # mean over tokens of -log V - mean_v log p_t(v)
        expected = _row_means(-math.log(batch.vocab_size) - batch.token_mean_logprob.cpu(), mask)
        torch.testing.assert_close(batch.rewards.cpu().double(), expected.double(), atol=1e-5, rtol=0)
        assert float(expected.min()) > 0  # a KL to the uniform distribution: the reward is not a constant 0
    if name == "rent":  # minus the mean token entropy
        expected = -_row_means(batch.token_entropy.cpu(), mask)
        torch.testing.assert_close(batch.rewards.cpu().double(), expected.double(), atol=1e-5, rtol=0)
    if name == "high_entropy_tokens":  # the top 20 % by entropy of the step's completion tokens
        entropy = batch.token_entropy.cpu()
        threshold = torch.quantile(entropy[mask > 0].float(), 0.8)
        kept = float(((entropy >= threshold) & (mask > 0)).sum()) / tokens
        assert logged["train/high_entropy_frac"] == pytest.approx(kept, abs=1e-6)
        assert logged["train/entropy_threshold"] == pytest.approx(float(threshold), abs=1e-6)
    if name == "clip_cov":  # max(1, int(2e-4 T)) = 1 token detached when one is eligible
        eligible = round(logged["train/clip_cov_eligible_frac"] * tokens)
        assert logged["train/clip_cov_frac"] == pytest.approx(min(1, eligible) / tokens, abs=1e-6)
    if name == "kl_cov":  # max(1, int(2e-4 T)) = 1 token penalised
        assert logged["train/kl_cov_frac"] == pytest.approx(1 / tokens, abs=1e-6)
    if name in SURROGATES:
        _check_surrogate(name, batch, logged)


SURROGATES = ("cispo", "sapo", "vespo", "luspo")
# each surrogate's own metric at r = w = 1: nothing capped, the gate and phi 1, nothing clipped
ON_POLICY_METRIC = {"cispo": ("cispo_clip_frac", 0.0), "sapo": ("sapo_gate_mean", 1.0),
                    "vespo": ("vespo_phi_mean", 1.0), "luspo": ("clip_frac_high", 0.0)}  # fmt: skip


def _loop_advantages(batch) -> list[float]:
    """GRPO's advantages by a plain loop: (r - group mean) / (unbiased group std + 1e-4), 0 when all are equal."""
    rewards, groups = batch.rewards.tolist(), batch.group_ids.tolist()
    advantages = []
    for reward, group in zip(rewards, groups, strict=True):
        members = [r for r, g in zip(rewards, groups, strict=True) if g == group]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
        advantages.append(0.0 if max(members) == min(members) else (reward - mean) / (std + 1e-4))
    return advantages


def _check_surrogate(name: str, batch, logged: dict[str, float]) -> None:
    """The trained step's policy loss by its formula, token by token. One optimizer step per rollout on the policy's
    own samples: the loss pass's log-probs are the scoring pass's (``old_logprobs``, the same forward), r = w = 1."""
    mask, logp = batch.completion_mask.cpu().tolist(), batch.old_logprobs.cpu().double().tolist()
    advantages = _loop_advantages(batch)
    tokens = sum(sum(row) for row in mask)
    expected = 0.0
    for a, row, lps in zip(advantages, mask, logp, strict=True):
        on = [lp for m, lp in zip(row, lps, strict=True) if m > 0]
        if name in ("cispo", "vespo"):  # -sg(min(1, 5)) A log pi, -sg(phi(1) = 1) A log pi, over all tokens
            expected += sum(-a * lp for lp in on) / tokens
        if name == "sapo":  # -sigmoid(0) 4 / tau A = -(2 / tau) A, tau 1.0 for A > 0 and 1.05 otherwise
            expected += len(on) * -(2.0 / (1.0 if a > 0 else 1.05)) * a / tokens
        if name == "luspo":  # |y_i| (-min(s A, clip(s) A)) with s = 1, averaged over completions
            expected += len(on) * -a / len(mask)
    assert logged["train/policy_loss"] == pytest.approx(expected, abs=1e-5)
    assert any(a != 0 for a in advantages)  # the step had a learning signal
    metric, value = ON_POLICY_METRIC[name]
    assert logged[f"train/{metric}"] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda path: path.stem)
def test_method_config_trains_the_embedded_task(config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    LastBatch.batch = None
    cli = _fit(config, tmp_path, "LastBatchWithOldLogprobs" if config.stem in SURROGATES else "LastBatch")
    logged = {key: float(value) for key, value in cli.trainer.logged_metrics.items()}
    assert math.isfinite(logged["train/loss"]) and "val/accuracy" in logged  # validation graded with golds
    start = dict(load_policy("lit-gcpo/tiny-arith").named_parameters())
    moved = [n for n, p in cli.model.policy.named_parameters() if not torch.equal(p.detach().cpu(), start[n].detach())]
    assert moved  # two optimizer steps moved the policy
    _check_method(config.stem, LastBatch.batch, logged)
