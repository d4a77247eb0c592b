"""Data-parallel and sharded training on the CPU (gloo) equal one process on the same global batch.

Each rank gets half of the prompts of the 1-process run (the prompt stream is sharded by global position and
each prompt's sampler is seeded from that position, so both runs sample the same completions). SGD, not Adam,
so that a wrong gradient scale shows: a wrong world-size factor, a per-rank std for ``advantage_scale: batch``,
a per-rank skip of a non-finite step or a per-rank gradient norm for clipping each make the weights differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

HERE = Path(__file__).parent
# 3 prompts x 4 completions per rank; rollout 1 has NaN old log-probs on rank 1's half (skipped everywhere)
COMMON = {"max_steps": 6, "poison_rollout": 1}

pytestmark = pytest.mark.slow


def run(model_dir: str, out: Path, **options) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    options = {**COMMON, **options}
    subprocess.run(
        [sys.executable, str(HERE / "ddp_run.py"), model_dir, str(out), json.dumps(options)],
        check=True,
        env=env,
        cwd=out,
        timeout=600,
    )
    return [torch.load(out / f"{options.get('tag', 'run')}-rank{r}.pt") for r in range(options["devices"])]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    for name, value in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], value, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    return {
        clip: run(tiny_model_dir, out, devices=1, batch_size=6, max_grad_norm=clip, tag=f"clip{clip}")[0]
        for clip in (0.0, 0.5)
    }


def test_ddp_two_ranks_equal_one_process(tiny_model_dir, tmp_path, single):
    rank0, rank1 = run(tiny_model_dir, tmp_path, devices=2, strategy="ddp", batch_size=3)
    reference = single[0.0]
    # 6 optimizer steps + 2 skipped (the poisoned rollout's 2 iterations) = 4 rollouts, on every rank
    assert rank0["skipped"] == rank1["skipped"] == reference["skipped"] == 2
    assert rank0["global_step"] == rank1["global_step"] == reference["global_step"] == 6
    assert rank0["consumed"] == rank1["consumed"] == 4
    assert_same_weights(rank0, rank1, atol=0)
    assert_same_weights(reference, rank0)
    assert rank0["loss"] == pytest.approx(reference["loss"], abs=1e-5)  # the logged loss is the global one
    # gradients are all-reduced once per optimizer step (8 attempted), not once per micro-batch (3 per step)
    assert rank0["allreduces"] == 8
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    assert any(not torch.allclose(v, initial[n]) for n, v in rank0["weights"].items() if n in initial)


def test_high_entropy_tokens_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """The entropy quantile is over the tokens of both ranks (gathered): 2 DDP ranks of 3 prompts train exactly as
    one process of 6 with the same mask, and differently from GRPO (the mask acts)."""
    (single,) = run(tiny_model_dir, tmp_path, devices=1, batch_size=6, high_entropy_rho=0.3, tag="he1")
    rank0, rank1 = run(tiny_model_dir, tmp_path, devices=2, strategy="ddp", batch_size=3, high_entropy_rho=0.3)
    assert_same_weights(rank0, rank1, atol=0)
    assert_same_weights(single, rank0)
    assert rank0["loss"] == pytest.approx(single["loss"], abs=1e-5)
    (grpo,) = run(tiny_model_dir, tmp_path, devices=1, batch_size=6, tag="grpo1")
    assert any(not torch.allclose(v, grpo["weights"][n], atol=1e-5) for n, v in single["weights"].items())


def test_fsdp2_two_ranks_equal_one_process_with_global_clipping_and_resume(tiny_model_dir, tmp_path, single):
    rank0, rank1 = run(tiny_model_dir, tmp_path, devices=2, strategy="fsdp2", batch_size=3, max_grad_norm=0.5)
    reference = single[0.5]
    assert rank0["skipped"] == rank1["skipped"] == reference["skipped"] == 2
    assert_same_weights(rank0, rank1, atol=0)
    assert_same_weights(reference, rank0)
    assert rank0["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    # interrupted after 4 optimizer steps (a full single-file checkpoint), resumed to 6: the same run
    ckpt = tmp_path / "fsdp-mid.ckpt"
    run(
        tiny_model_dir,
        tmp_path,
        devices=2,
        strategy="fsdp2",
        batch_size=3,
        max_grad_norm=0.5,
        max_steps=4,
        save=str(ckpt),
        tag="first",
    )
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False)
    assert not any("reference" in key for key in state["state_dict"])
    resumed = run(
        tiny_model_dir,
        tmp_path,
        devices=2,
        strategy="fsdp2",
        batch_size=3,
        max_grad_norm=0.5,
        resume=str(ckpt),
        tag="resumed",
    )
    assert resumed[0]["global_step"] == 6
    assert_same_weights(rank0, resumed[0])


def test_fsdp2_with_a_bf16_reference_equals_ddp(tiny_model_dir, tmp_path):
    """bf16-mixed with the KL term: the reference (bf16 linear layers, fp32 norms) is sharded like the policy,
    and the run equals DDP's, where nothing is sharded."""
    options = dict(devices=2, batch_size=3, max_steps=4, precision="bf16-mixed", beta=0.04, max_grad_norm=0.5)
    ddp = run(tiny_model_dir, tmp_path, strategy="ddp", tag="ddp-bf16", **options)[0]
    fsdp = run(tiny_model_dir, tmp_path, strategy="fsdp2", tag="fsdp-bf16", **options)[0]
    assert ddp["skipped"] == fsdp["skipped"] == 2
    assert fsdp["loss"] == pytest.approx(ddp["loss"], abs=1e-6)
    assert_same_weights(ddp, fsdp)


def test_uncertainty_weights_are_computed_over_both_ranks(tiny_model_dir, tmp_path):
    """The callback's weights on each rank equal the pure functions applied to the two ranks' batches
    concatenated (centring, scale and normalisation are over the whole step, METHODS.md 5.1), and both
    ranks log the same weight spread (statistics over every rank's groups)."""
    from lit_gcpo.algorithms.clustering import embedding_clusters
    from lit_gcpo.algorithms.uncertainty import advantage_weights, uncertainty_signals

    rank0, rank1 = run(tiny_model_dir, tmp_path, devices=2, strategy="ddp", batch_size=3, max_steps=2,
                       poison_rollout=None, uncertainty=True, tag="uncertainty")  # fmt: skip
    first, second = rank0["first_batch"], rank1["first_batch"]
    offset = int(first["group_ids"].max()) + 1
    group_ids = torch.cat([first["group_ids"], second["group_ids"] + offset])  # [N0 + N1]
    embeddings = torch.cat([first["embeddings"], second["embeddings"]])
    num_groups = int(group_ids.max()) + 1
    signals, _ = uncertainty_signals(
        group_ids, num_groups, rewards=torch.cat([first["rewards"], second["rewards"]]),
        cluster_ids=embedding_clusters(embeddings, group_ids, 0.9), embeddings=embeddings,
        seq_logprobs=torch.cat([first["seq_logprobs"], second["seq_logprobs"]]),
    )  # fmt: skip
    weights, _ = advantage_weights("gcpo", signals)
    written = torch.cat([first["advantage_weights"], second["advantage_weights"]])
    torch.testing.assert_close(written, weights[group_ids], atol=1e-5, rtol=1e-5)
    assert weights.std() > 0  # the check is not vacuous: the groups got different weights
    assert first["weight_std"] == second["weight_std"]


def test_readme_fsdp2_command_trains_checkpoints_and_exports(tmp_path):
    """The README's command with the embedded policy, whose completions end (EOS) at different steps on the
    two ranks: the sharded generation must keep the ranks' collectives in step (it hung before). 9 validation
    rows in batches of 2: 5 rows on rank 0, 4 on rank 1, which as plain slices made 3 batches against 2, and rank
    0's third batch waited forever for rank 1's forward passes."""
    root = Path(__file__).parents[1]
    command = [
        sys.executable, "-m", "lit_gcpo.running.cli", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--data.val.init_args.num_val", "9",
        "--data.val_batch_size", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=root, check=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] >= 2 and not any("reference" in key for key in state["state_dict"])
    exported = AutoModelForCausalLM.from_pretrained(next(tmp_path.rglob("policy")))
    assert exported.config.architectures == ["LlamaForCausalLM"]
    initial = AutoModelForCausalLM.from_pretrained(str(root / "lit_gcpo/assets/tiny-arith")).state_dict()
    assert any(not torch.equal(v, initial[n]) for n, v in exported.state_dict().items())


def test_fsdp2_resumes_an_optimizer_without_state(tiny_model_dir, tmp_path):
    """Plain SGD saves no optimizer state; Lightning's FSDP2 loader failed on it (IndexError): the resumed run
    must equal the uninterrupted one. The lr warms up over the 4 steps: the resumed optimizer must start from its
    saved lr (0.075 at step 2), not from the one a new scheduler sets (0.025)."""
    options = dict(devices=2, strategy="fsdp2", batch_size=3, momentum=0.0, max_steps=4, poison_rollout=None)
    options["warmup_steps"] = 4
    straight = run(tiny_model_dir, tmp_path, **options, tag="straight")
    ckpt = tmp_path / "plain-sgd.ckpt"
    run(tiny_model_dir, tmp_path, **{**options, "max_steps": 2}, save=str(ckpt), tag="first")
    state = torch.load(ckpt, weights_only=False)
    assert [optimizer["state"] for optimizer in state["optimizer_states"]] == [{}]  # the case under test
    resumed = run(tiny_model_dir, tmp_path, **options, resume=str(ckpt), tag="resumed")
    assert resumed[0]["global_step"] == straight[0]["global_step"] == 4
    assert_same_weights(straight[0], resumed[0], atol=1e-6)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    assert any(not torch.allclose(v, initial[n]) for n, v in resumed[0]["weights"].items() if n in initial)
