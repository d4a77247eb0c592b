"""benchmarks/compare_methods.py, the comparison's runner: what a run's config is, what its record holds, and that
records accumulate (a rerun skips what is recorded, a shard runs its share, a torn line is no record)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare_methods as runner  # noqa: E402

BASE = yaml.safe_load((REPO / "configs" / "compare_arithmetic.yaml").read_text())
QA_BASE = yaml.safe_load((REPO / "configs" / "compare_qa.yaml").read_text())


def base_of(testbed: str) -> dict:
    return QA_BASE if testbed == "qa" else BASE


def test_two_operand_validation_file_is_every_two_operand_problem() -> None:
    rows = [json.loads(line) for line in (REPO / "benchmarks/data/arithmetic_two_operand_all.jsonl").open()]
    assert len(rows) == 10 * 3 * 10 == len({row["prompt"] for row in rows})
    for row in rows:  # the gold is the expression's value, computed here independently
        a, op, b = row["prompt"][0], row["prompt"][1], row["prompt"][2]
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["prompt"] == f"{a}{op}{b}=" and row["answer"] == str(value) and row["level"] == 2


def test_run_config_changes_only_the_weighting_testbed_seed_and_paths(tmp_path: Path) -> None:
    grpo = runner.run_config(BASE, "arithmetic", "grpo", 3, tmp_path / "a")
    gcpo = runner.run_config(BASE, "arithmetic", "gcpo_cd", 3, tmp_path / "a")
    assert grpo["model"] == gcpo["model"] and grpo["data"] == gcpo["data"]
    weighting = {c["class_path"]: c["init_args"] for c in gcpo["trainer"]["callbacks"]}[runner.CALLBACK]
    assert weighting["method"] == "gcpo" and weighting["geometric"] == "cd" and weighting["clustering"] == "answer"
    assert not any("ModelCheckpoint" in c["class_path"] for c in gcpo["trainer"]["callbacks"])
    assert grpo["seed_everything"] == grpo["data"]["seed"] == 3
    noisy = runner.run_config(BASE, "noisy_easy", "grpo", 3, tmp_path / "a")
    train = noisy["data"]["train"]["init_args"]
    assert train["noisy_answers"] == "short" and train["noise_rate"] == runner.NOISE_RATE
    assert train["mix"] == BASE["data"]["train"]["init_args"]["mix"]  # the same problems
    assert noisy["data"]["val"] == BASE["data"]["val"]  # validation stays clean
    assert noisy["data"]["reward_weights"] == [1.0, 0.0]
    qa = runner.run_config(QA_BASE, "qa", "gcpo_bot", 3, tmp_path / "a")
    weighting = {c["class_path"]: c["init_args"] for c in qa["trainer"]["callbacks"]}[runner.CALLBACK]
    assert weighting["clustering"] == "embedding" and weighting["geometric"] == "bot"  # the QA config's clustering
    assert qa["data"]["train"] == QA_BASE["data"]["train"] and qa["data"]["rewards"] == ["qa_f1"]


def test_config_sha_ignores_seed_and_paths_only(tmp_path: Path) -> None:
    one = runner.run_config(BASE, "arithmetic", "grpo", 0, tmp_path / "x")
    other_seed = runner.run_config(BASE, "arithmetic", "grpo", 7, tmp_path / "y")
    assert runner.config_sha(one) == runner.config_sha(other_seed)
    for change in ("lr", "method"):
        changed = runner.run_config(BASE, "arithmetic", "grpo", 0, tmp_path / "x")
        if change == "lr":
            changed["model"]["optimizer"]["init_args"]["lr"] = 1e-4
        else:
            changed["trainer"]["callbacks"][0]["init_args"]["method"] = "rd_only"
        assert runner.config_sha(changed) != runner.config_sha(one), change
    # the design hash leaves the weighting out too: every method of a testbed shares it, the testbeds do not
    # (the design of a method with settings of its own is its config without them: run_hashes)
    designs = {
        (testbed, method): runner.config_sha(
            runner.run_config(base_of(testbed), testbed, method, 0, tmp_path, with_settings=False), weighting=False
        )
        for testbed in runner.TESTBEDS
        for method in runner.METHODS
        if runner.runs_on(method, testbed)
    }
    for testbed in runner.TESTBEDS:
        assert len({design for (bed, _), design in designs.items() if bed == testbed}) == 1
    assert len(set(designs.values())) == len(runner.TESTBEDS)


def test_the_wider_family_takes_its_settings_from_its_method_configs(tmp_path: Path) -> None:
    grpo = runner.run_config(BASE, "arithmetic", "grpo", 3, tmp_path)
    for method in ("high_entropy_tokens", "clip_cov", "kl_cov", "ttrl", "empo", "self_certainty", "rent"):
        config = runner.run_config(BASE, "arithmetic", method, 3, tmp_path)
        own = yaml.safe_load((REPO / "configs" / "methods" / f"{method}.yaml").read_text())
        weighting = {c["class_path"]: c["init_args"] for c in config["trainer"]["callbacks"]}[runner.CALLBACK]
        assert weighting["method"] == "grpo"  # w = 1: the method is its own settings
        if method in ("high_entropy_tokens", "clip_cov", "kl_cov"):
            assert config["model"]["token_selection"] == own["model"]["token_selection"]
            assert {k: v for k, v in config["model"].items() if k != "token_selection"} == grpo["model"]
            assert config["data"] == grpo["data"]
        else:
            assert config["data"]["label_free"] == own["data"]["label_free"] and config["data"]["rewards"] == []
            assert config["model"] == grpo["model"]
        # without its settings the run is grpo's: the design every method of the testbed shares
        assert runner.run_config(BASE, "arithmetic", method, 3, tmp_path, with_settings=False) == grpo
    # label-free methods read no reward: not on the noisy arms (their noise is in the reward); answer votes not on qa
    jobs = set(runner.plan(list(runner.TESTBEDS), list(runner.METHODS), [0], official_seeds=1))
    assert ("noisy_hard", "ttrl", 0) not in jobs and ("noisy_easy", "rent", 0) not in jobs
    assert ("qa", "empo", 0) not in jobs and ("qa", "self_certainty", 0) in jobs
    assert ("noisy_hard", "kl_cov", 0) in jobs and ("arithmetic", "ttrl", 0) in jobs
    assert len(jobs) == 6 * 4 + 3 * 4 + 4 + 2  # the six, the token selections everywhere, label-free where they run


def test_options_added_later_are_not_hashed_at_their_default() -> None:
    """A resolved config of today holds model.token_selection and data.label_free (None) where the configs hashed
    for the records had no such keys: at None they are left out, so the recorded methods keep their hashes."""
    before = {"model": {"lr": 1.0}, "data": {"rewards": ["r"]}, "trainer": {}}
    today = {"model": {"lr": 1.0, "token_selection": None}, "data": {"rewards": ["r"], "label_free": None}}
    today["trainer"] = {}
    assert runner.config_sha(today) == runner.config_sha(before)
    assert runner.config_sha(today, weighting=False) == runner.config_sha(before, weighting=False)
    chosen = {**today, "model": {"lr": 1.0, "token_selection": {"class_path": "KLCov"}}}
    assert runner.config_sha(chosen) != runner.config_sha(before)


def test_plan_seeds_shards_and_records(tmp_path: Path) -> None:
    assert runner.parse_seeds(["0-3", "7"]) == [0, 1, 2, 3, 7]
    jobs = list(runner.plan(["arithmetic"], ["grpo", "seed_grpo"], [0, 1, 2], official_seeds=2))
    assert jobs == [
        ("arithmetic", m, s) for s, m in [(0, "grpo"), (0, "seed_grpo"), (1, "grpo"), (1, "seed_grpo"), (2, "grpo")]
    ]
    index, count = runner.parse_shard("2/3")
    assert jobs[index::count] == [jobs[1], jobs[4]]
    with pytest.raises(SystemExit, match="--shard"):
        runner.parse_shard("3/2")
    path = tmp_path / "r.jsonl"
    runner.append_record(path, {"seed": 1})
    runner.append_record(path, {"seed": 2})
    with open(path, "a") as handle:
        handle.write('{"seed": 3, "tor')  # a kill in the middle of a write
    assert runner.read_records(path) == [{"seed": 1}, {"seed": 2}]


@pytest.mark.slow
def test_runner_records_a_real_run_and_skips_it_on_rerun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results.jsonl"
    argv = [
        "--seeds",
        "0",
        "--methods",
        "gcpo_bot",
        "--testbeds",
        "noisy_hard",
        "--steps",
        "2",
        "--results",
        str(results),
        "--out",
        str(tmp_path / "runs"),
    ]
    runner.main(argv)
    (record,) = runner.read_records(results)
    assert (record["testbed"], record["method"], record["seed"], record["steps"]) == ("noisy_hard", "gcpo_bot", 0, 2)
    assert record["val_size"] == 300 and record["batch_size"] == 64 and record["group_size"] == 8
    assert [step for step, _ in record["val_curve"]] == [0, 2]
    assert record["start_val_accuracy"] == record["val_curve"][0][1]
    assert record["final_val_accuracy"] == record["val_curve"][-1][1]
    # accuracies on 300 problems are multiples of 1/300
    assert all(abs(value * 300 - round(value * 300)) < 1e-3 for _, value in record["val_curve"])
    assert record["weight_std_mean"] > 0 and record["weight_min"] < 1 < record["weight_max"]  # gcpo weights move
    assert len(record["config_sha"]) == len(record["design_sha"]) == 16 and record["commit"]
    assert record["design_sha"] != record["config_sha"]  # the weighting is hashed in one of them only
    runner.main(argv)  # the record exists: nothing runs, nothing is appended
    assert len(runner.read_records(results)) == 1
    assert "1 recorded, 0 to run" in capsys.readouterr().out


def test_compare_hashes_flags_a_changed_or_missing_recorded_method() -> None:
    import compare_hashes

    before = {"arithmetic/grpo": ["a", "d"], "arithmetic/gcpo_bot": ["b", "d"], "qa/grpo": ["c", "e"]}
    after = {"arithmetic/grpo": ["a", "d"], "arithmetic/gcpo_bot": ["b", "x"], "arithmetic/ttrl": ["f", "d"]}
    lines, changed = compare_hashes.comparison(before, after)
    assert changed == ["arithmetic/gcpo_bot", "qa/grpo"]  # a design hash changed; a method went missing
    assert "| arithmetic/ttrl | — | f | — | d | new |" in lines and "| arithmetic/grpo | a | a | d | d | yes |" in lines
