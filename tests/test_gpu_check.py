"""benchmarks/gpu_check.py: the CPU smoke run of the GPU acceptance check reports what it measured, consistently, and
fails when the code it checks is wrong; the GPU-only pieces (the Qwen2.5-Math-1.5B architecture, the random policy
and its padded tokenizer) work on the CPU at a small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lit_gcpo.rewards.loading import REWARDS

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402

# Planted bugs, each of which one check must catch: the scoring pass outside the training step's autocast (old
# log-probs from another computation than the loss's under bf16-mixed), and a DataModule whose resume position is not
# restored.
PLANTED = """
import sys, torch
sys.path.insert(0, {benchmarks!r})
import gpu_check
from lit_gcpo.data.datamodule import RolloutDataModule
from lit_gcpo.training.module import GRPOModule
GRPOModule.precision_context = lambda self: torch.autocast("cpu", enabled=False)
RolloutDataModule.load_state_dict = lambda self, state: None
sys.exit(gpu_check.main(["--cpu-smoke", "--out", {out!r}]))
"""


# What scripts/gpu_wheels.sh leaves out (datasets with pyarrow and pandas, vllm): hidden from the smoke run as on the
# acceptance machine (a None in sys.modules makes both `import` and `importlib.util.find_spec` find nothing).
HIDDEN = ("datasets", "pyarrow", "pandas", "vllm")


def run_smoke(
    out: Path, code: str | None = None, hide: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)] if code is None else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hide:
        site = out.parent / "hide"
        site.mkdir()
        (site / "sitecustomize.py").write_text(f"import sys\nfor name in {hide!r}:\n    sys.modules[name] = None\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    done = subprocess.run(command, input=code, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.is_file(), done.stderr[-3000:]
    return done, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return run_smoke(tmp_path_factory.mktemp("smoke") / "smoke.json", hide=HIDDEN)


def test_smoke_passes_and_says_what_it_skipped(smoke):
    done, report = smoke
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert report["mode"] == "cpu-smoke" and report["precision"] == "bf16-mixed" and report["engine"] == "hf"
    assert report["passed"] is True and report["failed"] == []
    expected = {"generation_short", "generation_long", "training", "on_policy_ratio", "checkpoint_resume"}
    expected |= {"fsdp2_step", "peak_memory", "vllm_engine", "time_budget"}
    assert set(report["checks"]) == expected
    # no GPU: no GPU memory to measure; vLLM is not part of the acceptance machine's wheels
    assert report["skipped"] == ["peak_memory", "vllm_engine"]
    assert all(report["checks"][name]["reason"] for name in report["skipped"])
    assert report["summary"]["peak_gpu_memory_gib"] is None and report["environment"]["peak_rss_mib"] > 0
    # the run could import none of the packages the GPU wheels leave out, and every one they bring
    importable = report["environment"]["importable"]
    assert not importable["datasets"] and not importable["vllm"]
    assert importable["math_verify"] and importable["jsonargparse"] and importable["faiss"]


def test_on_policy_ratio_is_one_with_old_logprobs_from_the_scoring_pass(smoke):
    _, report = smoke
    ratio = report["checks"]["on_policy_ratio"]
    assert ratio["status"] == "pass" and ratio["old_logprobs_from"].startswith("the scoring pass")
    assert (
        abs(ratio["ratio_min"] - 1) <= 1e-6 and abs(ratio["ratio_max"] - 1) <= 1e-6 and abs(ratio["approx_kl"]) <= 1e-6
    )
    first = report["parts"]["rollout_short"]["steps"][0]
    assert first["scored_old_logprobs"] is True and first["global_step"] == 1
    assert (first["ratio_min"], first["ratio_max"]) == (ratio["ratio_min"], ratio["ratio_max"])


def test_resumed_weights_and_optimizer_state_equal_the_saved_ones(smoke):
    _, report = smoke
    resume = report["checks"]["checkpoint_resume"]
    assert resume["status"] == "pass"
    assert resume["weights_saved"] == resume["weights_compared"] == resume["weights_equal"] > 0
    assert resume["optimizer_saved"] == resume["optimizer_compared"] == resume["optimizer_equal"] > 0
    assert resume["weights_max_abs_diff"] == 0.0 and resume["optimizer_max_abs_diff"] == 0.0
    # the saved weights are trained ones (a restore that did nothing would leave the initial weights)
    assert resume["restored_differs_from_initial"] is True
    planned = report["parts"]["rollout_short"]["steps_planned"]
    assert resume["saved_global_step"] == resume["global_step_after_restore"] == planned
    assert resume["consumed_batches_after_restore"] == resume["saved_consumed_batches"] == planned
    assert resume["global_step_after_resumed_steps"] == planned + 1 and len(resume["steps"]) == 1


def test_fsdp2_step_ran_sharded_on_one_rank(smoke):
    _, report = smoke
    fsdp2 = report["checks"]["fsdp2_step"]
    assert fsdp2["status"] == "pass" and fsdp2["strategy_class"] == "FSDP2Strategy" and fsdp2["devices"] == 1
    assert fsdp2["policy_sharded"] is True and fsdp2["dtensor_parameters"] > 0
    assert fsdp2["global_step"] == 1 and fsdp2["weights_changed"] is True
    assert fsdp2["steps"][0]["skipped_steps"] == 0


def test_tokens_per_second_follow_from_the_counted_tokens_and_times(smoke):
    _, report = smoke
    parts, checks = report["parts"], report["checks"]
    for name, size in (("rollout_short", "short"), ("rollout_long", "long")):
        part = parts[name]
        assert len(part["steps"]) == part["steps_planned"]
        for step in part["steps"]:
            assert step["rows"] == part["prompts"] * part["group_size"]
            assert 0 < step["completion_tokens"] <= step["rows"] * part["max_new_tokens"]
            assert step["tokens"] > step["completion_tokens"]  # prompt tokens go through the training pass too
            assert step["generate_s"] > 0 and step["train_s"] > 0
            assert step["generation_tokens_per_s"] == pytest.approx(step["completion_tokens"] / step["generate_s"])
            assert step["train_tokens_per_s"] == pytest.approx(step["tokens"] / step["train_s"])
        # the part's wall time holds its steps' generation and training
        assert sum(s["generate_s"] + s["train_s"] for s in part["steps"]) < part["elapsed_s"]
        last, generation = part["steps"][-1], checks[f"generation_{size}"]
        assert generation["max_new_tokens"] == part["max_new_tokens"]
        assert generation["tokens_per_s"] == last["generation_tokens_per_s"] > 0
        assert report["summary"]["generation_tokens_per_s"][str(part["max_new_tokens"])] == generation["tokens_per_s"]
        trained = next(s for s in checks["training"]["sizes"] if s["max_new_tokens"] == part["max_new_tokens"])
        assert trained["tokens_per_s"] == last["train_tokens_per_s"] > 0
    assert checks["training"]["status"] == "pass"
    assert parts["rollout_long"]["max_new_tokens"] > parts["rollout_short"]["max_new_tokens"]
    budget = checks["time_budget"]
    assert budget["status"] == "pass" and budget["elapsed_s"] == report["elapsed_s"] <= budget["budget_s"]


def test_planted_bugs_fail_their_checks_and_the_exit_status(tmp_path):
    out = tmp_path / "planted.json"
    done, report = run_smoke(out, PLANTED.format(benchmarks=str(SCRIPT.parent), out=str(out)))
    assert done.returncode == 1
    assert report["passed"] is False and report["failed"] == ["checkpoint_resume", "on_policy_ratio"]
    ratio = report["checks"]["on_policy_ratio"]
    assert ratio["max_abs_deviation"] > 1e-6  # scoring in fp32 against a bf16 training pass
    resume = report["checks"]["checkpoint_resume"]
    assert resume["consumed_batches_after_restore"] == 0 != resume["saved_consumed_batches"]
    assert resume["weights_equal"] == resume["weights_saved"]  # the weights themselves were restored


@pytest.mark.parametrize(
    ("field", "value"), [("ratio_max", 1 + 2e-6), ("ratio_min", 1 - 2e-6), ("approx_kl", 2e-6), ("ratio_max", "nan")]
)
def test_ratio_verdict_fails_beyond_the_tolerance(field, value):
    step = {"ratio_min": 1.0, "ratio_max": 1.0, "approx_kl": 0.0, "scored_old_logprobs": True}
    assert gpu_check.verdict_ratio({"steps": [step]})["status"] == "pass"
    step[field] = float(value)
    assert gpu_check.verdict_ratio({"steps": [step]})["status"] == "fail"
    # on-policy without a scoring pass the ratio is 1 by construction: it proves nothing
    assert gpu_check.verdict_ratio({"steps": [{**step, field: 1.0, "scored_old_logprobs": False}]})["status"] == "fail"


def test_architecture_config_is_qwen25_math_15b():
    config = gpu_check.architecture_config()
    assert type(config).__name__ == "Qwen2Config" and config.architectures == ["Qwen2ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1536, 28, 8960)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (12, 2, 151936)
    assert config.rope_parameters["rope_theta"] == 10000 and config.max_position_embeddings == 4096
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-6 and not config.use_sliding_window
    assert set(config.layer_types) == {"full_attention"}
    h, kv, i, v = 1536, 2 * 128, 8960, 151936
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert v * h + 28 * layer + h == gpu_check.EXPECTED_PARAMETERS
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == gpu_check.EXPECTED_PARAMETERS


@pytest.fixture(scope="module")
def small_qwen(tmp_path_factory) -> dict:
    """The GPU run's policy at a small width (2 layers of 32, one KV head), its vocabulary and tokenizer full size."""
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = gpu_check.architecture_config(**small, num_key_value_heads=1)
    return gpu_check.write_random_policy(config, tmp_path_factory.mktemp("small-qwen"), torch.device("cpu"))


def test_random_policy_and_padded_tokenizer_sample_through_the_module(small_qwen):
    """The module loads the policy and its tokenizer from their folders, every id the random policy samples decodes
    to text, and the digit-share reward differs within a group."""
    from lit_gcpo.assets.tiny_model import build_char_tokenizer
    from lit_gcpo.engines import build_engine
    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.training.module import GRPOModule

    built = small_qwen
    # tied embeddings; per layer q (with bias), k and v (one KV head of 16, with bias), o, the MLP, two norms
    layer = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert built["parameters"] == 151936 * 32 + 2 * layer + 32
    module = GRPOModule(model=built["model"], tokenizer=built["tokenizer"], export_dir=None)
    assert type(module.policy).__name__ == "Qwen2ForCausalLM" and module.policy.config.vocab_size == 151936
    tokenizer = module.tokenizer
    assert "Qwen2" not in type(tokenizer).__name__ and len(tokenizer) == 151936
    assert tokenizer("12+3=")["input_ids"] == build_char_tokenizer()("12+3=")["input_ids"]
    assert tokenizer.decode([151935]) == f"<{151935 - len(gpu_check.VOCAB)}>"
    engine = build_engine("hf", module.policy, tokenizer)
    generation = engine.generate([tokenizer("7*8=")["input_ids"]], 4, SamplingConfig(max_new_tokens=12), seeds=[1])
    texts = tokenizer.batch_decode(generation.completion_ids, skip_special_tokens=True)
    assert all(len(text) >= len(ids) for text, ids in zip(texts, generation.completion_ids, strict=True))
    assert len(set(gpu_check.digit_share([""] * 4, texts))) > 1


@pytest.fixture
def digit_share_reward():
    """gpu_check's reward registered for one in-process test, then taken out: the registry stays the project's."""
    gpu_check.register_rewards()
    yield
    REWARDS.remove(gpu_check.DIGIT_SHARE)


def test_gpu_plan_parts_pass_on_the_small_qwen_policy(small_qwen, tmp_path, digit_share_reward):
    """Each part of the GPU run, on the random Qwen2 policy with the padded tokenizer (the smoke uses the tiny Llama):
    random completions run to the limit, the digit-share reward gives every step a gradient, the resume is exact and
    the fsdp2 step shards this architecture too."""
    size = gpu_check.Size(max_new_tokens=12, prompts=2, group_size=4, micro_batch_size=4, steps=2)
    one = replace(size, steps=1)
    plan = gpu_check.Plan(
        "small-qwen", "cpu", "bf16-mixed", short=size, long=size, fsdp2=one, resume=one, time_budget_s=0
    )
    check = gpu_check.Check(plan, tmp_path, gpu_check.Policy(small_qwen["model"], small_qwen["tokenizer"]))
    record, saved = check.rollout("rollout_short", size, tmp_path / "short.ckpt")
    steps = record["steps"]
    assert [s["completion_tokens"] for s in steps] == [8 * 12, 8 * 12] and steps[0]["truncated_frac"] == 1.0
    assert all(s["grad_norm"] > 0 for s in steps)
    assert gpu_check.verdict_rollout(record)["status"] == "pass"
    assert gpu_check.verdict_ratio(record)["status"] == "pass"
    assert gpu_check.verdict_training([record])["status"] == "pass"
    resume = gpu_check.verdict_resume(check.resume(tmp_path / "short.ckpt", saved))
    assert resume["status"] == "pass" and resume["weights_equal"] == resume["weights_saved"] > 0
    fsdp2 = gpu_check.verdict_fsdp2(check.fsdp2())
    assert fsdp2["status"] == "pass" and fsdp2["policy_sharded"] and fsdp2["weights_changed"]
