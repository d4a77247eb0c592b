"""``uncertainty_faithfulness.py --compare-dir``: the comparison's records map to the right policy, prompts, reward,
sampling and signals per testbed (benchmarks/faithfulness_testbeds.py), what cannot be diagnosed is refused, and the
table's rows equal ``diagnose`` run directly on the same policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import compare_methods
import faithfulness_diagnosis
import uncertainty_faithfulness as script
from faithfulness_testbeds import ISSUE_20_COMMITS, compare_targets, comparison_setting

from lit_gcpo.algorithms.uncertainty import uncertainty_signals

ARITHMETIC_CONFIG = compare_methods.REPO / "configs" / "compare_arithmetic.yaml"
QA_CONFIG = compare_methods.REPO / "configs" / "compare_qa.yaml"
COMMIT = next(iter(ISSUE_20_COMMITS))  # compare-v1's: the default design
RUNS = (("arithmetic", "grpo"), ("noisy_hard", "grpo"), ("noisy_hard", "rd_only"))


def _record(testbed: str, method: str, seed: int = 0, commit: str = COMMIT, **extra) -> dict:
    return {
        "testbed": testbed, "method": method, "seed": seed, "commit": commit, "config": "compare_arithmetic.yaml",
        "config_sha": f"sha-{testbed}-{method}", **extra,
    }  # fmt: skip


def _policy(run_dir: Path) -> None:
    """Export the shipped tiny policy to ``run_dir/policy`` as a run's ``model.export_dir`` holds it, and the run's
    config as compare_methods.py writes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gcpo.assets.tiny_model import TINY_MODEL_PATH

    AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH).save_pretrained(run_dir / "policy")
    AutoTokenizer.from_pretrained(TINY_MODEL_PATH).save_pretrained(run_dir / "policy")
    testbed, method = run_dir.parts[-3], run_dir.parts[-2]
    base = yaml.safe_load(ARITHMETIC_CONFIG.read_text())
    config = compare_methods.run_config(base, testbed, method, 0, run_dir)
    (run_dir / "fit_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A fake comparison: the issue-20 design's seed-0 runs of ``RUNS``, plus records the default must leave out
    (seed 1, another design), and the records file."""
    root = tmp_path_factory.mktemp("compare")
    records = [_record(t, m) for t, m in RUNS]
    records += [
        _record("arithmetic", "grpo", seed=1),
        _record("arithmetic", "ttrl", commit="e1d25aa", design_sha="0cb", config_sha="sha-ttrl"),
    ]
    for testbed, method in RUNS:
        _policy(root / f"sha-{testbed}-{method}" / testbed / method / "seed0")
    _policy(root / "sha-ttrl" / "arithmetic" / "ttrl" / "seed0")
    results = root / "compare_methods.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, results


def test_records_map_to_their_policies_and_testbeds(compare_dir) -> None:
    root, results = compare_dir
    targets = compare_targets(compare_methods.read_records(results), root)
    assert [(t.testbed, t.method, t.seed) for t in targets] == [(t, m, 0) for t, m in RUNS]
    assert [t.policy for t in targets] == [root / f"sha-{t}-{m}" / t / m / "seed0" / "policy" for t, m in RUNS]
    arithmetic, noisy, _ = (t.setting for t in targets)
    # arithmetic: the comparison's validation problems, its reward and sampling, answer clusters
    base = yaml.safe_load(ARITHMETIC_CONFIG.read_text())
    assert arithmetic.source == base["data"]["val"] and arithmetic.rewards == base["data"]["rewards"]
    assert arithmetic.sampling == base["data"]["sampling"] and not arithmetic.noisy
    assert arithmetic.batch_size == noisy.batch_size == base["data"]["batch_size"] == 64  # a chunk = a step's prompts
    assert (arithmetic.clustering, arithmetic.embeddings) == ("answer", "batch")
    # noisy_hard: the training prompts with compare_methods.py's own noise settings and reward
    init = noisy.source["init_args"]
    assert noisy.source["class_path"] == compare_methods.NOISY_SOURCE and noisy.noisy
    assert (init["noise_rate"], init["noisy_share"]) == (compare_methods.NOISE_RATE, compare_methods.NOISY_SHARE)
    assert init["noisy_answers"] == compare_methods.TESTBEDS["noisy_hard"]["noisy_answers"] == "long"
    assert noisy.rewards == [compare_methods.NOISY_REWARD, "math_accuracy_final"] and noisy.reward_weights == [1, 0]
    # the other design's and the other seed's records were left out; another design is chosen by its prefix
    (ttrl,) = compare_targets(compare_methods.read_records(results), root, design=["0c"])
    assert ttrl.policy == root / "sha-ttrl" / "arithmetic" / "ttrl" / "seed0" / "policy"
    # a label-free run trained on its own reward (its fit_config, checked against compare_methods.py's config for
    # ttrl, says so); it is diagnosed on the testbed's reward like every policy
    ran = yaml.safe_load((ttrl.policy.parent / "fit_config.yaml").read_text())["data"]
    assert ran["label_free"] is not None and ttrl.setting == arithmetic


def test_each_noisy_arms_noise_settings_reach_the_prompt_loader(monkeypatch) -> None:
    from lit_gcpo.tasks import noisy_arithmetic

    received = []

    class Spy(noisy_arithmetic.NoisyArithmeticTask):
        def __init__(self, **kwargs):
            received.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(noisy_arithmetic, "NoisyArithmeticTask", Spy)
    for testbed, long_answers in (("noisy_hard", True), ("noisy_easy", False)):
        rows = comparison_setting(testbed, ARITHMETIC_CONFIG).load_rows(400, seed=0)
        kwargs = received.pop()
        assert kwargs["noise_rate"] == compare_methods.NOISE_RATE == 0.18
        assert kwargs["noisy_share"] == compare_methods.NOISY_SHARE == 0.5
        assert kwargs["noisy_answers"] == compare_methods.TESTBEDS[testbed]["noisy_answers"]
        assert (kwargs["split"], kwargs["noisy_levels"]) == ("train", [2])
        noisy = [row for row in rows if row["noise_rate"] > 0]
        assert {row["noise_rate"] for row in noisy} == {0.18}
        # the arm's noise sits on its kind of prompt: two-character answers (two digits or negative) or one digit
        assert noisy and all((len(row["answer"]) >= 2) == long_answers for row in noisy)
        # half of that kind is noisy (400 of 5,000 drawn: a share within 4 binomial sigma of 0.5)
        kind = [row for row in rows if (len(row["answer"]) >= 2) == long_answers]
        assert abs(len(noisy) / len(kind) - 0.5) < 4 * (0.25 / len(kind)) ** 0.5


def test_prompts_are_a_seeded_subset_and_qa_uses_its_reward_and_embedding_clusters() -> None:
    setting = comparison_setting("arithmetic", ARITHMETIC_CONFIG)
    every = setting.load_rows(10_000, seed=0)
    assert len(every) == 300  # the file has them all; nothing subsampled
    chosen = setting.load_rows(8, seed=0)
    assert len({r["prompt"] for r in chosen}) == 8 and all(r in every for r in chosen)
    assert chosen == setting.load_rows(8, seed=0) != setting.load_rows(8, seed=1)
    assert not all(r["prompt"].startswith("0+") for r in chosen)  # not the file's first rows (0+0=, 0+1=, ...)
    qa = comparison_setting("qa", QA_CONFIG)
    config = yaml.safe_load(QA_CONFIG.read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    assert qa.rewards == config["data"]["rewards"] == ["qa_f1"] and qa.source == config["data"]["val"]
    assert (qa.clustering, qa.embeddings, qa.tau) == (callback["clustering"], callback["embeddings"], callback["tau"])
    assert qa.clustering == "embedding" and qa.sampling == config["data"]["sampling"]
    assert qa.batch_size == config["data"]["batch_size"] == 32


def test_embedding_clusters_and_sentence_embeddings_make_the_qa_signals() -> None:
    """One group of four free-text answers, red / crimson / red / blue: the stub encoder puts the synonyms at cos
    0.99, blue orthogonal, so tau 0.85 gives two clusters of 3 and 1 (TTRL's majority share 3/4; answer clustering
    of these unboxed texts would give one cluster, majority 1)."""
    vectors = {"red": [1.0, 0.0], "crimson": [0.99, 0.141], "blue": [0.0, 1.0]}
    encoder = SimpleNamespace(encode=lambda texts: torch.tensor([vectors[t] for t in texts]))
    completions = ["red", "crimson", "red", "blue"]
    batch = SimpleNamespace(
        group_ids=torch.zeros(4, dtype=torch.long), num_groups=1, rewards=torch.tensor([1.0, 1.0, 1.0, 0.0]),
        completions=completions, answers=[None] * 4, embeddings=torch.randn(4, 3), seq_logprobs=torch.zeros(4),
        token_entropy=torch.rand(4, 2), token_mean_logprob=-torch.rand(4, 2) - 2.5, completion_mask=torch.ones(4, 2),
        vocab_size=12,
    )  # fmt: skip
    setting = comparison_setting("qa", QA_CONFIG)
    signals = faithfulness_diagnosis.batch_signals(batch, setting, encoder)
    assert float(signals["majority"][0]) == pytest.approx(0.75)
    expected, _ = uncertainty_signals(
        batch.group_ids, 1, rewards=batch.rewards, cluster_ids=torch.tensor([0, 0, 0, 1]),
        embeddings=encoder.encode(completions), seq_logprobs=batch.seq_logprobs, se_kind="rao", geometric="bot",
        center="batch",
    )  # fmt: skip
    for name in ("se", "cd", "bot", "rd"):
        torch.testing.assert_close(signals[name], expected[name].double())


def test_what_cannot_be_diagnosed_is_refused(compare_dir, tmp_path, capsys) -> None:
    root, results = compare_dir
    records = compare_methods.read_records(results)
    with pytest.raises(ValueError, match=r"testbed 'noisy' of the records is not a testbed of compare_methods\.py"):
        compare_targets([*records, _record("noisy", "grpo")], root)
    with pytest.raises(ValueError, match="--testbeds qa: the design has no run of seed 0"):
        compare_targets(records, root, testbeds=["arithmetic", "qa"])
    with pytest.raises(ValueError, match="--methods gcpo_cd: the design has no run"):
        compare_targets(records, root, methods=["grpo", "gcpo_cd"])
    with pytest.raises(ValueError, match="--policy-seed 7"):
        compare_targets(records, root, seed=7)
    with pytest.raises(ValueError, match="--design ffff: no record"):
        compare_targets(records, root, design=["ffff"])
    with pytest.raises(ValueError, match="arithmetic, method grpo: seed 0 has runs of config_sha"):
        compare_targets([*records, _record("arithmetic", "grpo", config_sha="other")], root)
    with pytest.raises(FileNotFoundError, match="noisy_hard rd_only seed 0"):
        compare_targets(records, tmp_path, testbeds=["noisy_hard"], methods=["rd_only"])
    # a run whose own config trained with another noise rate than compare_methods.py's is refused, naming it
    changed = tmp_path / "sha-noisy_hard-grpo" / "noisy_hard" / "grpo" / "seed0"
    _policy(changed)
    config = yaml.safe_load((changed / "fit_config.yaml").read_text())
    config["data"]["train"]["init_args"]["noise_rate"] = 0.25
    (changed / "fit_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"testbed noisy_hard: .* another setting \(source: run .*0\.25"):
        compare_targets(records, tmp_path, testbeds=["noisy_hard"], methods=["grpo"])
    for argv, message in (
        (["--compare-dir", str(root), "--prompts", "x.jsonl"], "--prompts with --compare-dir"),
        (["--methods", "grpo"], "--methods chooses among the compared policies"),
        (["--compare-dir", str(root), "--testbeds", "noisy"], "invalid choice: 'noisy'"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message in capsys.readouterr().err


def _table(printed: list[str], header: str) -> list[str]:
    """The rows of the markdown table whose header starts with ``header``."""
    start = next(i for i, line in enumerate(printed) if line.startswith(header)) + 2
    end = next((i for i in range(start, len(printed)) if not printed[i].startswith("|")), len(printed))
    return printed[start:end]


def test_compare_dir_rows_equal_diagnose_on_the_same_policies(compare_dir, capsys, monkeypatch) -> None:
    root, results = compare_dir
    sampled = []  # the sampling of every generate call: the testbeds' training sampling, seeded per chunk
    original = faithfulness_diagnosis.RolloutCollector.collect

    def spy(self, batch, size, sampling, *rest, **kw):
        sampled.append(sampling)
        return original(self, batch, size, sampling, *rest, **kw)

    monkeypatch.setattr(faithfulness_diagnosis.RolloutCollector, "collect", spy)
    argv = [
        "--compare-dir", str(root), "--results", str(results), "--num-prompts", "16", "--group-size", "4",
        "--resamples", "50", "--params", r"layers\.1\.", "--no-write",
    ]  # fmt: skip
    script.main(argv)
    printed = capsys.readouterr().out.splitlines()
    rows = _table(printed, "| testbed | method |")
    noise = _table(printed, "| testbed | policy (method) |")
    args = script.parse_args(argv)
    targets = compare_targets(compare_methods.read_records(results), root)
    assert len(rows) == len(targets) == 3 and len(noise) == 2  # one row per policy; the noisy arm's two policies
    training = yaml.safe_load(ARITHMETIC_CONFIG.read_text())["data"]["sampling"]  # 0.7, 16 tokens, stop at "}"
    assert len(sampled) == 3 and all(
        (s.temperature, s.max_new_tokens, s.stop, s.seed) == (training["temperature"], training["max_new_tokens"],
                                                               training["stop"], 0) for s in sampled
    )  # fmt: skip
    for target, row in zip(targets, rows, strict=True):
        torch.manual_seed(args.seed)
        diagnosis = faithfulness_diagnosis.diagnose(str(target.policy), args, target.setting)
        assert row == script.compare_row(target, diagnosis)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:3] == [target.testbed, target.method, str(diagnosis.spread_prompts)]
        assert cells[3:6] == [str(diagnosis.results[name].spread_prompts) for name in ("se", "cd", "bot")]
        assert diagnosis.spread_prompts >= 3
        for name in ("se", "bot", "length"):  # finite correlations with finite intervals
            value = diagnosis.results[name].spread_prompts
            assert all(abs(x) <= 1 for x in (value.value, value.low, value.high)), (target, name, value)
        own = diagnosis.noise_ratios.get(target.method)  # a weighting's own weights, on the noisy arm only
        assert (own is not None) == ((target.testbed, target.method) == ("noisy_hard", "rd_only"))
        assert cells[-1] == ("—" if own is None else script.ratio_text(own.ratio))
        if target.testbed == "noisy_hard":
            assert noise.pop(0) == script.noise_row(target, diagnosis)
            assert set(diagnosis.noise_ratios) == set(faithfulness_diagnosis.WEIGHTINGS)
