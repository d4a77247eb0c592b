"""The parts of benchmarks/bench_vs_trl.py that can be wrong without TRL: the work (model sizes, tokenizer,
reward), the lit-gcpo command line and the TRL arguments it must match, the step-split arithmetic, the
environments, the foreign CPU share and the rule that refuses a busy machine's rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_vs_trl import DEFAULT_ENVIRONMENTS, parse_args, per_size, plan, results_section, runner_command
from vs_trl_env import (
    ENVIRONMENTS,
    LOADED_SHARE,
    QUIET_SHARE,
    busy_ticks,
    foreign_share,
    refused_runs,
    run_environment,
)
from vs_trl_report import split_of, unequal_lengths
from vs_trl_work import (
    EXPECTED_PARAMETERS,
    REWARD_PATH,
    SIZES,
    build_model,
    build_tokenizer,
    lit_args,
    prompt_rows,
    sum_reward,
    trl_config_kwargs,
    write_work,
)


def test_20m_policy_has_the_stated_parameter_count() -> None:
    size = SIZES["20m"]
    # Per layer: q, k, v, o 4 x 512^2 = 1,048,576; gate, up, down 3 x 512 x 1536 = 2,359,296; two norms 1,024
    # -> 3,408,896; six layers 20,453,376; final norm 512; embeddings + separate LM head 2 x 99 x 512 = 101,376.
    assert size.parameters == 6 * (4 * 512**2 + 3 * 512 * 1536 + 2 * 512) + 512 + 2 * 99 * 512 == 20_555_264
    config = build_model(size=size).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 6, 8)
    with torch.device("meta"):  # the count without allocating the weights
        from transformers import LlamaForCausalLM

        meta = LlamaForCausalLM(config)
    assert sum(p.numel() for p in meta.parameters()) == size.parameters
    assert size.max_new_tokens == 128 and SIZES["tiny"].max_new_tokens == 32


def test_tiny_policy_has_the_stated_parameter_count() -> None:
    model = build_model()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 4)
    assert config.intermediate_size == 256 and not config.tie_word_embeddings and config.vocab_size == 99
    # Per layer: q, k, v, o 4 x 128^2 = 65,536; gate, up, down 3 x 128 x 256 = 98,304; two norms 256
    # -> 164,096; two layers 328,192; final norm 128; embeddings + separate LM head 2 x 99 x 128 = 25,344.
    assert EXPECTED_PARAMETERS == 2 * (4 * 128**2 + 3 * 128 * 256 + 2 * 128) + 128 + 2 * 99 * 128 == 353_664
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS
    assert all(not m.training or getattr(m, "p", 0.0) == 0.0 for m in model.modules() if "Dropout" in type(m).__name__)


def test_tokenizer_round_trips_every_prompt_one_token_per_character() -> None:
    tokenizer = build_tokenizer()
    rows = prompt_rows()
    assert len(rows) == 400 and rows[0] == {"prompt": "What is 0+0? Answer:", "answer": "0"}
    assert rows[-1] == {"prompt": "What is 19+19? Answer:", "answer": "38"}
    for row in rows:
        ids = tokenizer(row["prompt"])["input_ids"]
        assert len(ids) == len(row["prompt"])  # no BOS added, no merges
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == row["prompt"]
    specials = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert len(set(specials)) == 3 and max(specials) < 4


def test_sum_reward_scores_the_sum_as_a_whole_number() -> None:
    completions = [" 7", "7.", "the answer is 7 apples", "17", "70", "1 7", "", "3+4=7", " 12", "x112", "12y"]
    gold = ["7", "7", "7", "7", "7", "7", "7", "7", "12", "12", "12"]
    # "17", "70" contain 7 only as part of another number, "1 7" contains 7 as a whole number.
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert sum_reward(["p"] * len(gold), completions, answer=gold, completion_ids=None) == expected


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_lit_command_line_parses_to_the_stated_work_and_matches_trl(tmp_path: Path, beta: float) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_gcpo.rewards.loading import load_reward
    from lit_gcpo.running.cli import main as cli_main

    files, _ = write_work(tmp_path / "work")
    args = lit_args(files, beta=beta, steps=5, run_dir=tmp_path / "run")
    assert args[0] == "fit"
    cli = cli_main(args[1:], run=False)
    data, hp, trainer = cli.datamodule, cli.model.hparams, cli.trainer
    assert (data.batch_size, data.group_size) == (8, 8)
    sampling = data.sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (32, 1.0, 1.0, -1)
    assert (data.engine_name, data.template, data.chat) == ("hf", "{prompt}", "never")
    assert data.reward_names == [REWARD_PATH] and load_reward(REWARD_PATH) is sum_reward
    assert (hp.advantage, hp.loss_aggregation, hp.kl_estimator) == ("dr_grpo", "seq_mean_token_sum_norm", "k3")
    assert hp.beta == beta and hp.num_iterations == 1 and hp.micro_batch_size == 0
    assert hp.max_grad_norm == 1.0 and hp.export_dir is None
    assert hp.dtype == "float32" and not hp.gradient_checkpointing and hp.disable_dropout
    assert hp.warmup_steps == 0 and hp.get("scheduler") is None  # the default schedule is then constant
    assert trainer.max_steps == 5 and trainer.precision == "32-true" and trainer.checkpoint_callback is None
    assert isinstance(trainer.logger, TensorBoardLogger) and trainer.limit_val_batches == 0
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-5 and optimizer.param_groups[0]["weight_decay"] == 0.0

    # TRL's arguments describe the same work as the parsed lit-gcpo run.
    trl = trl_config_kwargs(beta, steps=5, output_dir=tmp_path / "trl")
    assert trl["per_device_train_batch_size"] == data.batch_size * data.group_size
    assert trl["num_generations"] == data.group_size and trl["steps_per_generation"] == 1
    assert trl["gradient_accumulation_steps"] == 1 and trl["num_iterations"] == hp.num_iterations
    assert trl["max_completion_length"] == sampling.max_new_tokens and trl["max_steps"] == trainer.max_steps
    assert (trl["temperature"], trl["top_p"], trl["top_k"]) == (sampling.temperature, sampling.top_p, 0)
    assert (trl["loss_type"], trl["scale_rewards"], trl["beta"]) == ("dr_grpo", "none", hp.beta)
    assert not trl["use_bias_correction_kl"]  # lit-gcpo's k3 term is not multiplied by the ratio
    assert trl["learning_rate"] == optimizer.param_groups[0]["lr"] and trl["weight_decay"] == 0.0
    assert (trl["lr_scheduler_type"], trl["warmup_steps"], trl["max_grad_norm"]) == ("constant", 0, hp.max_grad_norm)
    assert not trl["bf16"] and not trl["fp16"] and not trl["gradient_checkpointing"] and trl["disable_dropout"]
    assert (trl["save_strategy"], trl["eval_strategy"], trl["logging_steps"]) == ("no", "no", 1)


def test_split_leaves_out_the_warmup_steps_and_pairs_walls_with_their_step() -> None:
    # Six steps: walls[k] is step k + 2. Steps 1-3 are warm-up, so steps 4, 5, 6 count: walls 1.0, 2.0, 4.0.
    walls = [9.0, 9.0, 1.0, 2.0, 4.0]
    lit_phases = [{"generate": 5.0, "reward": 0.0, "score": 0.0, "train": 5.0}] * 3 + [
        {"generate": 0.5, "reward": 0.1, "score": 0.1, "train": 0.2},  # step 4: rest 1.0 - 0.9 = 0.1
        {"generate": 1.0, "reward": 0.1, "score": 0.1, "train": 0.4},  # step 5: rest 2.0 - 1.6 = 0.4
        {"generate": 3.0, "reward": 0.1, "score": 0.1, "train": 0.6},  # step 6: rest 4.0 - 3.8 = 0.2
    ]
    split = split_of({"framework": "lit", "walls": walls, "phases": lit_phases}, warmup_steps=3)
    assert split["step"] == pytest.approx(2.0) and split["generate"] == pytest.approx(1.0)
    assert split["train"] == pytest.approx(0.4) and split["rest"] == pytest.approx(0.2)
    # TRL: the rollout (_prepare_inputs) holds generation and rewards; training is the time from the step's
    # start to its optimizer step minus the rollout. Step 4 of 1.0 s: generate 0.4, rewards 0.1, rollout 0.6
    # (so 0.1 other rollout work), optimizer step reached after 0.9 (train 0.3), rest 0.1.
    trl_phases = [{"transformers.generate": 5.0, "_calculate_rewards": 0.0, "_prepare_inputs": 5.0}] * 3 + [
        {"transformers.generate": 0.4, "_calculate_rewards": 0.1, "_prepare_inputs": 0.6, "until_optimizer_step": 0.9}
    ]
    record = {"framework": "trl", "walls": [9.0, 9.0, 1.0], "cpus": [5.0, 5.0, 1.5], "phases": trl_phases}
    split = split_of(record, warmup_steps=3)
    expected = {"generate": 0.4, "reward": 0.1, "score": 0.1, "train": 0.3, "rest": 0.1, "step": 1.0, "cpu": 1.5}
    assert split == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- environments
def test_environments_set_the_wait_policy_each_framework_gets() -> None:
    base = {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"}  # a value inherited from the shell must not leak in
    as_user = {fw: run_environment(base, ENVIRONMENTS["as-a-user"], fw) for fw in ("trl", "lit")}
    assert all("OMP_WAIT_POLICY" not in env and env["PATH"] == "/bin" for env in as_user.values())
    for policy in ("ACTIVE", "PASSIVE"):
        assert {run_environment(base, ENVIRONMENTS[policy], fw)["OMP_WAIT_POLICY"] for fw in ("trl", "lit")} == {policy}
    loaded = ENVIRONMENTS["loaded"]
    assert loaded.loaded and loaded.wait_policy == ENVIRONMENTS["as-a-user"].wait_policy
    assert [e for e, env in ENVIRONMENTS.items() if env.loaded] == ["loaded"]
    assert next(iter(ENVIRONMENTS)) == "as-a-user"  # the row quoted first


def test_plan_interleaves_environments_and_alternates_who_goes_first() -> None:
    runs = plan(["tiny"], ["as-a-user", "ACTIVE", "loaded"], [0.0], {"tiny": 2})
    order = [(r["repeat"], r["environment"], r["framework"]) for r in runs]
    assert order == [
        (0, "as-a-user", "trl"), (0, "as-a-user", "lit"), (0, "ACTIVE", "trl"), (0, "ACTIVE", "lit"),
        (0, "loaded", "trl"), (0, "loaded", "lit"),
        (1, "ACTIVE", "lit"), (1, "ACTIVE", "trl"), (1, "loaded", "lit"), (1, "loaded", "trl"),
        (1, "as-a-user", "lit"), (1, "as-a-user", "trl"),
    ]  # fmt: skip
    assert per_size(None, {"tiny": 20, "20m": 6}, ["tiny", "20m"], "--steps") == {"tiny": 20, "20m": 6}
    assert per_size(["8", "20m=3"], {"tiny": 20, "20m": 6}, ["tiny", "20m"], "--steps") == {"tiny": 8, "20m": 3}
    with pytest.raises(SystemExit, match="--steps 'huge=3'"):
        per_size(["huge=3"], {"tiny": 20}, ["tiny"], "--steps")


STAT = (
    "cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} 0\ncpu0 1 2 3 4 5 6 7 8 9 0\nintr 5\n"
)


def _stat(user: int, system: int, idle: int, iowait: int = 0, guest: int = 0) -> str:
    return STAT.format(
        user=user, nice=0, system=system, idle=idle, iowait=iowait, irq=0, softirq=0, steal=0, guest=guest
    )


def test_busy_ticks_leave_out_idle_iowait_and_guest_counted_twice() -> None:
    # user 100 + system 50 busy; idle 800 and iowait 30 not; guest 40 is already inside user: not added again
    assert busy_ticks(_stat(100, 50, 800, iowait=30, guest=40)) == (150, 980)
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        busy_ticks("cpu0 1 2 3 4 5 6 7 8\n")


def test_foreign_share_is_busy_time_minus_the_runs_own_over_wall_times_cores() -> None:
    # 10 s on 2 cores at 100 ticks/s: busy ticks 300 -> 1,700 = 14 s busy; the run used 9 s itself, so 5 s were
    # others': 5 / (10 x 2) = 0.25.
    before, after = _stat(200, 100, 5000), _stat(1200, 500, 5600)
    assert foreign_share(before, after, own_cpu_s=9.0, wall_s=10.0, cores=2, ticks_per_s=100) == pytest.approx(0.25)
    # a quiet machine: busy 14 s, the run 14.3 s (the clocks are sampled a moment apart): 0, not negative
    assert foreign_share(before, after, own_cpu_s=14.3, wall_s=10.0, cores=2, ticks_per_s=100) == 0.0


def test_busy_quiet_runs_and_unloaded_loaded_runs_are_refused_by_name() -> None:
    def run(environment: str, share: float, framework: str = "trl") -> dict:
        return {"environment": environment, "size": "tiny", "beta": 0.0, "framework": framework, "repeat": 1,
                "foreign_share": share}  # fmt: skip

    ok = [run("as-a-user", QUIET_SHARE), run("PASSIVE", 0.0, "lit"), run("loaded", LOADED_SHARE)]
    assert refused_runs(ok, ENVIRONMENTS) == []
    messages = refused_runs([*ok, run("ACTIVE", 0.31, "lit"), run("loaded", 0.2)], ENVIRONMENTS)
    assert messages == [
        "ACTIVE tiny beta 0 lit repeat 1: foreign CPU share 0.31 > 0.1 (the machine was not quiet)",
        "loaded tiny beta 0 trl repeat 1: foreign CPU share 0.20 < 0.35 (the load was not there)",
    ]


def test_background_load_keeps_each_core_busy_and_stops() -> None:
    import os
    import time

    from vs_trl_env import BackgroundLoad

    def cpu_seconds(pid: int) -> float:  # utime + stime: fields 14 and 15 of /proc/PID/stat, in clock ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with BackgroundLoad(cores=2, lifetime_s=120) as load:
        assert len(load.processes) == 2
        deadline = time.monotonic() + 90  # however loaded the machine, each loop keeps running and gains CPU
        while min(cpu_seconds(p.pid) for p in load.processes) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert min(cpu_seconds(p.pid) for p in load.processes) >= 1.0
        assert all(p.poll() is None for p in load.processes)
        processes = list(load.processes)
    assert load.processes == [] and all(p.returncode is not None for p in processes)  # killed and reaped


def test_a_busy_loop_ends_when_its_lifetime_is_over() -> None:
    import subprocess
    import time

    from vs_trl_env import BUSY_LOOP

    start = time.monotonic()
    subprocess.run([sys.executable, "-c", BUSY_LOOP.format(lifetime=0.5)], timeout=60, check=True)
    assert time.monotonic() - start < 30


def test_wait_policy_environments_cover_each_policy_quiet_and_loaded(tmp_path: Path) -> None:
    from bench_wait_policy import environments

    table = environments()
    assert list(table) == [
        "CLI default", "ACTIVE", "PASSIVE", "CLI default, loaded", "ACTIVE, loaded", "PASSIVE, loaded",
    ]  # fmt: skip
    base = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "OMP_WAIT_POLICY" not in run_environment(base, table["CLI default, loaded"], "lit")
    assert run_environment({}, table["PASSIVE"], "lit")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert [label for label, env in table.items() if env.loaded] == [label for label in table if "loaded" in label]
    files, _ = write_work(tmp_path / "work")
    hf = lit_args(files, 0.0, 5, tmp_path / "run")
    vllm = lit_args(files, 0.0, 5, tmp_path / "run", engine="vllm")
    assert "--data.engine=hf" in hf and "--data.engine_options" not in hf
    position = vllm.index("--data.engine_options")
    assert "--data.engine=vllm" in vllm and '"max_model_len": 256' in vllm[position + 1]
    assert [a for a in vllm if a not in ("--data.engine=vllm", "--data.engine_options", vllm[position + 1])] == [
        a for a in hf if a != "--data.engine=hf"
    ]  # nothing else differs


# ------------------------------------------------------------------------------------ same-length control
def test_same_length_is_its_own_environment_added_by_its_option() -> None:
    control = ENVIRONMENTS["same-length"]
    assert control.same_length and not control.loaded and control.wait_policy == ENVIRONMENTS["as-a-user"].wait_policy
    assert [e for e, env in ENVIRONMENTS.items() if env.same_length] == ["same-length"]
    assert DEFAULT_ENVIRONMENTS == ["as-a-user", "ACTIVE", "PASSIVE", "loaded"]  # not run (nor quoted) by default
    assert parse_args([]).environments == DEFAULT_ENVIRONMENTS
    assert parse_args(["--same-length"]).environments == [*DEFAULT_ENVIRONMENTS, "same-length"]
    assert parse_args(["--environments", "PASSIVE", "--same-length"]).environments == ["PASSIVE", "same-length"]
    assert parse_args(["--environments", "same-length", "--same-length"]).environments == ["same-length"]


@pytest.mark.parametrize(
    ("environment", "size", "min_tokens"),
    [("same-length", "20m", 128), ("as-a-user", "20m", 0), ("same-length", "tiny", 32), ("loaded", "tiny", 0)],
)
def test_the_runner_gets_min_tokens_only_in_the_same_length_environment(
    tmp_path: Path, environment: str, size: str, min_tokens: int
) -> None:
    from vs_trl_runner import parse_args as runner_args

    run = {"framework": "trl", "beta": 0.0, "environment": environment}
    command = runner_command(Path("python"), tmp_path, run, SIZES[size], 4, tmp_path / "out.json")
    parsed = runner_args(command[2:])  # what the runner reads of it
    assert (parsed.framework, parsed.steps, parsed.engine) == ("trl", 4, "hf")
    assert parsed.max_new_tokens == SIZES[size].max_new_tokens and parsed.min_tokens == min_tokens


@pytest.mark.parametrize("min_tokens", [0, 32])
def test_both_sides_get_the_same_least_length(tmp_path: Path, min_tokens: int) -> None:
    """lit-gcpo parses ``data.sampling.min_tokens``; TRL's ``GRPOConfig`` gets ``generation_kwargs`` that TRL 1.16
    merges into its ``GenerationConfig`` (``min_new_tokens``) only when it is set."""
    from lit_gcpo.running.cli import main as cli_main

    files, _ = write_work(tmp_path / "work")
    args = lit_args(files, 0.0, 5, tmp_path / "run", min_tokens=min_tokens)
    sampling = cli_main(args[1:], run=False).datamodule.sampling
    assert (sampling.max_new_tokens, sampling.min_tokens) == (32, min_tokens)
    trl = trl_config_kwargs(0.0, steps=5, output_dir=tmp_path / "trl", min_tokens=min_tokens)
    assert trl.get("generation_kwargs") == ({"min_new_tokens": min_tokens} if min_tokens else None)


def test_transformers_holds_the_eos_off_for_min_new_tokens_as_trl_passes_it() -> None:
    """TRL 1.16's ``model.generate`` path: ``GenerationConfig(max_new_tokens, do_sample, eos_token_id, ...)`` updated
    with ``generation_kwargs``. On the tiny work's policy with its EOS logit +30 (it would end at once) every
    completion then has exactly the most new tokens; without, every one is the EOS alone."""
    from transformers import GenerationConfig

    tokenizer, model = build_tokenizer(), build_model().eval()
    eos = tokenizer.eos_token_id
    model.lm_head.register_forward_hook(lambda _m, _i, logits: logits.index_add(
        -1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 30.0)))  # fmt: skip
    prompt = torch.tensor([tokenizer("What is 3+4? Answer:")["input_ids"]] * 4)
    base = dict(max_new_tokens=8, do_sample=True, eos_token_id=[eos], pad_token_id=tokenizer.pad_token_id, top_k=0)
    for extra, lengths in (({}, [1] * 4), ({"min_new_tokens": 8}, [8] * 4)):
        torch.manual_seed(0)
        out = model.generate(prompt, generation_config=GenerationConfig(**base, **extra))[:, prompt.shape[1] :]
        ends = [(row == eos).nonzero()[0].item() + 1 if (row == eos).any() else len(row) for row in out]
        assert ends == lengths


def test_unequal_lengths_name_the_same_length_runs_that_broke_the_control() -> None:
    def run(environment: str, tokens: list[float], framework: str = "trl", size: str = "20m") -> dict:
        return {"environment": environment, "size": size, "beta": 0.0, "framework": framework, "repeat": 0,
                "completion_tokens": tokens}  # fmt: skip

    # 20m: 8 prompts x 8 completions x 128 tokens = 8,192 a step; tiny 8 x 8 x 32 = 2,048
    ok = [run("same-length", [8192.0] * 4), run("same-length", [8192] * 4, "lit"), run("as-a-user", [4797.0, 5425.0])]
    assert unequal_lengths([*ok, run("same-length", [2048] * 3, size="tiny")], ENVIRONMENTS) == []
    broken = [*ok, run("same-length", [8192, 8100.5, 8192], "lit")]
    assert unequal_lengths(broken, ENVIRONMENTS) == [
        "same-length 20m beta 0 lit repeat 0: completion tokens per step 8100.5, 8192, not 8 x 8 x 128 = 8192 at "
        "every step"
    ]


def test_only_the_full_comparison_writes_its_section_and_a_partial_run_writes_its_own() -> None:
    both, defaults = ["tiny", "20m"], list(DEFAULT_ENVIRONMENTS)
    assert results_section(both, defaults, busy=False) == "bench_vs_trl"
    assert results_section(both, [*defaults, "same-length"], busy=False) == "bench_vs_trl"
    assert results_section(["20m"], ["same-length"], busy=False) == "bench_vs_trl_same_length"
    assert results_section(["20m"], defaults, busy=False) == "bench_vs_trl_partial"  # one size cannot replace both
    assert results_section(both, ["PASSIVE", "same-length"], busy=False) == "bench_vs_trl_partial"
    assert results_section(both, defaults, busy=True) == "bench_vs_trl_busy"
