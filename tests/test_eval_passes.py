"""Per-benchmark settings, greedy and sampled passes in one run, and the report a paper needs."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from eval_cli import FIXTURES, cli_test_args, source

from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.engines.base import SamplingConfig
from lit_gcpo.evaluation.callback import BenchmarkReport
from lit_gcpo.evaluation.paper import format_paper_table, load_runs, paper_rows
from lit_gcpo.evaluation.paper import main as paper_main
from lit_gcpo.evaluation.results import summarise
from lit_gcpo.evaluation.sources import QASPER_TEMPLATE, BenchmarkSource, EvalVariant
from lit_gcpo.running.cli import main


# ------------------------------------------------------------------------- settings per benchmark
def test_source_settings_override_the_datamodules_and_greedy_adds_a_pass() -> None:
    base = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=300)
    plain = BenchmarkSource("gsm8k", "unused.jsonl")
    assert plain.eval_variants(base, 4) == [EvalVariant("", base, 4)]
    aime = BenchmarkSource("aime24", "unused.jsonl", samples=32, temperature=0.8, max_new_tokens=3000, greedy=True)
    greedy, sampled = aime.eval_variants(base, 4)
    assert greedy == EvalVariant("greedy", SamplingConfig(temperature=0.0, top_p=0.95, max_new_tokens=3000), 1)
    assert sampled == EvalVariant("sampled", SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=3000), 32)
    assert BenchmarkSource("qasper", "unused.jsonl").template == QASPER_TEMPLATE
    with pytest.raises(ValueError, match=r"greedy: true adds a greedy pass.*temperature 0 too"):
        BenchmarkSource("gsm8k", "unused.jsonl", greedy=True).eval_variants(SamplingConfig(temperature=0.0), 4)


def test_min_tokens_holds_up_to_a_benchmarks_own_limit() -> None:
    # data.sampling: min_tokens 200 of 300; a benchmark of 100 new tokens caps it at 100, one of 3000 keeps 200
    base = SamplingConfig(temperature=0.6, max_new_tokens=300, min_tokens=200)
    (short,) = BenchmarkSource("gsm8k", "unused.jsonl", max_new_tokens=100).eval_variants(base, 4)
    (long,) = BenchmarkSource("gsm8k", "unused.jsonl", max_new_tokens=3000).eval_variants(base, 4)
    assert (short.sampling.max_new_tokens, short.sampling.min_tokens) == (100, 100)
    assert (long.sampling.max_new_tokens, long.sampling.min_tokens) == (3000, 200)


@pytest.mark.parametrize(
    ("option", "value"), [("samples", 0), ("temperature", -0.5), ("max_new_tokens", 0), ("max_context_tokens", 0)]
)
def test_bad_source_settings_name_the_benchmark_and_option(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"BenchmarkSource\('aime24'\): {option} must be >= "):
        BenchmarkSource("aime24", "unused.jsonl", **{option: value})


def test_one_run_evaluates_greedy_and_sampled_with_each_benchmarks_settings(
    tiny_model_dir, tmp_path, monkeypatch, capsys
) -> None:
    calls: list[tuple[int, int, float, int]] = []  # (prompts, samples, temperature, max_new_tokens)
    original = RolloutCollector.collect

    def spy(self, batch, group_size, sampling, device, seeds=None, **options):
        calls.append((len(batch), group_size, sampling.temperature, sampling.max_new_tokens))
        return original(self, batch, group_size, sampling, device, seeds=seeds, **options)

    monkeypatch.setattr(RolloutCollector, "collect", spy)
    sources = [
        source("gsm8k", FIXTURES / "gsm8k.sample.jsonl", greedy=True, samples=3, temperature=0.7, max_new_tokens=5),
        source("hotpotqa", FIXTURES / "hotpotqa_dev_distractor.sample.jsonl", max_new_tokens=7, max_context_tokens=40),
    ]
    main(cli_test_args(tiny_model_dir, tmp_path, sources, samples=2, max_new_tokens=12, batch_size=4))
    # gsm8k: 5 prompts in batches of 4 -> 2 batches per pass; hotpotqa: 3 prompts, 1 batch, defaults
    # (val_samples 2, val_temperature 1.0) but its own max_new_tokens.
    assert calls == [(4, 1, 0.0, 5), (1, 1, 0.0, 5), (4, 3, 0.7, 5), (1, 3, 0.7, 5), (3, 2, 1.0, 7)]
    document = json.loads((tmp_path / "test_benchmarks.json").read_text())
    assert list(document["summary"]) == ["gsm8k/greedy", "gsm8k/sampled", "hotpotqa"]
    by_pass: dict[str, list[dict[str, Any]]] = {}
    for item in document["items"]:
        by_pass.setdefault(item["benchmark"] + "/" + item["variant"], []).append(item)
    assert {name: len(items) for name, items in by_pass.items()} == {
        "gsm8k/greedy": 5,
        "gsm8k/sampled": 5,
        "hotpotqa/": 3,
    }
    assert all(len(i["completions"]) == 1 and max(i["lengths"]) <= 5 for i in by_pass["gsm8k/greedy"])
    assert all(len(i["completions"]) == 3 and max(i["lengths"]) <= 5 for i in by_pass["gsm8k/sampled"])
    assert all(len(i["completions"]) == 2 and max(i["lengths"]) <= 7 for i in by_pass["hotpotqa/"])
    # the greedy pass reports accuracy, the sampled one avg@3 and pass@k, side by side in one table
    assert "accuracy" in document["summary"]["gsm8k/greedy"] and "avg@3" in document["summary"]["gsm8k/sampled"]
    table = (tmp_path / "test_table.md").read_text()
    assert "| gsm8k/greedy " in table and "| gsm8k/sampled " in table
    paper = (tmp_path / "test_paper.md").read_text()
    assert "gsm8k/greedy (accuracy)" in paper and "gsm8k/sampled (avg@3)" in paper and "hotpotqa (f1)" in paper

    # Restarted into the same directory with another context budget for HotpotQA: its saved batches were
    # made from other prompts, and the run stops before generating anything.
    calls.clear()
    sources[1]["init_args"]["max_context_tokens"] = 30
    with pytest.raises(ValueError, match=r"the prompts of 'hotpotqa\(.*\)' at positions \[0, 1, 2\] are not"):
        main(cli_test_args(tiny_model_dir, tmp_path, sources, samples=2, max_new_tokens=12, batch_size=4))
    assert calls == []


# ------------------------------------------------------------------ lengths, truncation, context
def _batch(prompt_tokens: list[int], lengths: list[list[int]], truncated: list[list[bool]]) -> RolloutBatch:
    """One math prompt per entry (gold "1", every completion answers 2: all wrong), with the given sizes."""
    group = len(lengths[0])
    n = len(prompt_tokens) * group
    width_p, width_c = max(prompt_tokens), max(max(row) for row in lengths)
    attention = torch.zeros(n, width_p + width_c, dtype=torch.long)
    completion = torch.zeros(n, width_c)
    for b, (p, row) in enumerate(zip(prompt_tokens, lengths, strict=True)):
        for j, length in enumerate(row):
            attention[b * group + j, width_p - p : width_p + length] = 1
            completion[b * group + j, :length] = 1
    rows = [{"id": str(b), "index": b, "kind": "math", "benchmark": "toy", "gold": "1"} for b in range(len(lengths))]
    return RolloutBatch(
        prompts=[f"p{b}" for b in range(len(rows))],
        rows=rows,
        completions=["\\boxed{2}"] * n,
        input_ids=torch.zeros(n, width_p + width_c, dtype=torch.long),
        attention_mask=attention,
        completion_mask=completion,
        group_ids=torch.arange(len(rows)).repeat_interleave(group),
        rewards=torch.zeros(n),
        truncated=torch.tensor([t for row in truncated for t in row]),
    )


def test_length_truncation_and_over_context_counts_by_hand(tmp_path, caplog) -> None:
    batch = _batch([10, 300, 257], [[4, 8], [8, 8], [1, 3]], [[False, True], [True, True], [False, False]])
    report = BenchmarkReport(context_length=256, resume=False)
    records = report.grade_batch(batch)
    assert [r["prompt_tokens"] for r in records] == [10, 300, 257]
    values = summarise(records, context_length=256)["toy"]
    # lengths 4 8 8 8 1 3: mean 32 / 6; truncated 3 of 6; prompts over 256 tokens: 300 and 257 -> 2
    assert values["length_mean"] == pytest.approx(32 / 6)
    assert values["truncated_frac"] == pytest.approx(0.5)
    assert values["over_context"] == 2.0
    trainer = SimpleNamespace(
        world_size=1, is_global_zero=True, datamodule=None, log_dir=str(tmp_path), default_root_dir=str(tmp_path)
    )
    module = SimpleNamespace(log=lambda *args, **kwargs: None, hparams={"model": "toy-model"})
    report.on_test_epoch_start(trainer, module)
    report.on_test_batch_end(trainer, module, None, batch, 0, 0)
    with caplog.at_level(logging.WARNING):
        report.on_test_epoch_end(trainer, module)
    assert "toy: 2 of 3 prompts are longer than the model's context (256 tokens)" in caplog.text
    saved = json.loads((tmp_path / "test_benchmarks.json").read_text())
    assert saved["label"] == "toy-model" and saved["summary"]["toy"]["over_context"] == 2


@pytest.mark.parametrize("long_prompts", ["truncate", "skip"])
def test_prompts_over_the_context_are_counted_before_truncation_and_skipped_ones_reported(
    long_prompts: str, tiny_model_dir, tmp_path, monkeypatch, caplog
) -> None:
    # The tiny model reads 256 positions, one token per character; with 6 new tokens a prompt may have 250.
    monkeypatch.chdir(tmp_path)
    questions = ["What is 1+1?", "1+" * 200 + "1?", "What is 2+2?", "3+" * 150 + "3?", "What is 3+3?"]
    rows = [{"question": q, "answer": f"so #### {i}"} for i, q in enumerate(questions)]
    rows.append({"question": "What is 4+4?", "answer": "eight (no final-answer mark: unreadable gold)"})
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources = [source("gsm8k", path, template="{prompt}")]
    args = cli_test_args(tiny_model_dir, tmp_path / "out", sources, samples=2, max_new_tokens=6, batch_size=4)
    with caplog.at_level(logging.WARNING):
        main([*args, f"--data.long_prompts={long_prompts}", "--data.chat=never"])
    document = json.loads((tmp_path / "out" / "test_benchmarks.json").read_text())
    values = document["summary"]["gsm8k"]
    # 6 rows: 1 unreadable gold, 2 prompts of 402 and 302 tokens over the 250 left: cut and graded, or skipped
    graded = {"truncate": 5, "skip": 3}[long_prompts]
    assert (values["items"], values["skipped"], values["over_context"]) == (graded, 6 - graded, 2)
    items = document["items"]
    assert [item["id"] for item in items if item["over_context"]] == (
        ["gsm8k-1", "gsm8k-3"] if long_prompts == "truncate" else []
    )
    assert all(item["prompt_tokens"] <= 250 for item in items)
    dropped = ["gsm8k-1", "gsm8k-3"] if long_prompts == "skip" else []
    assert document["skipped_over_context"] == ({"gsm8k": dropped} if dropped else {})
    assert document["skipped"] == {"gsm8k": ["gsm8k-5", *dropped]}
    header, _, row = (
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in (tmp_path / "out" / "test_table.md").read_text().splitlines()
    )
    table = dict(zip(header, row, strict=True))  # the table shows what was skipped next to what was graded
    assert (table["items"], table["skipped"], table["over_context"]) == (str(graded), str(6 - graded), "2")
    assert "gsm8k: 2 of 6 prompts are longer than the model's context" in caplog.text


def test_context_length_defaults_to_the_policys_positions() -> None:
    module = SimpleNamespace(policy=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)))
    assert BenchmarkReport()._context_length(module) == 4096
    assert BenchmarkReport(context_length=100)._context_length(module) == 100
    assert BenchmarkReport()._context_length(SimpleNamespace()) is None


# ---------------------------------------------------------------------------------- paper table
SUMMARY_A = {
    "math500/greedy": {"items": 5, "accuracy": 0.4, "length_mean": 10},
    "math500/sampled": {"items": 5, "avg@8": 0.35, "pass@8": 0.8},
    "aime24/greedy": {"items": 5, "accuracy": 0.2},
    "aime24/sampled": {"items": 5, "avg@8": 0.1},
    "hotpotqa/greedy": {"items": 3, "em": 0.0, "f1": 0.5},
    "hotpotqa/sampled": {"items": 3, "em": 0.0, "f1": 0.25, "pass@8": 0.5},
}
SUMMARY_B = {k: v for k, v in SUMMARY_A.items() if not k.startswith("aime24")}  # a run without AIME


def test_paper_rows_headlines_and_averages_by_hand() -> None:
    columns, table = paper_rows({"A": SUMMARY_A, "B": SUMMARY_B}, {"math": ["math500", "aime24"]})
    assert columns[:6] == list(SUMMARY_A) and columns[6:] == ["math/greedy", "math/sampled"]
    row = table["A"]
    # headlines in percent: accuracy (greedy), avg@8 (sampled), f1 (QA)
    assert [row[c] for c in columns[:6]] == pytest.approx([40, 35, 20, 10, 50, 25])
    assert row["math/greedy"] == pytest.approx((40 + 20) / 2) and row["math/sampled"] == pytest.approx((35 + 10) / 2)
    assert math.isnan(table["B"]["aime24/greedy"]) and math.isnan(table["B"]["math/greedy"])  # missing: no average
    text = format_paper_table({"A": SUMMARY_A, "B": SUMMARY_B})
    lines = text.splitlines()
    assert lines[0].startswith("| model") and "math500/sampled (avg@8)" in lines[0] and "average/greedy" in lines[0]
    # default average: every benchmark, per pass: greedy (40 + 20 + 50) / 3 = 36.7
    assert lines[2].split("|")[-3].strip() == "36.7" and lines[3].split("|")[3].strip() == "35.0"
    assert lines[3].split("|")[-3].strip() == "-"
    with pytest.raises(ValueError, match="average 'math' names benchmarks not in the results: \\['gsm8k'\\]"):
        paper_rows({"A": SUMMARY_A}, {"math": ["math500", "gsm8k"]})


def test_paper_table_from_several_runs_files(tmp_path, capsys) -> None:
    paths = []
    for label, summary in (("base", SUMMARY_A), ("trained", SUMMARY_B)):
        (tmp_path / label).mkdir()
        path = tmp_path / label / "test_benchmarks.json"
        path.write_text(json.dumps({"label": label, "summary": summary, "averages": {"qa": ["hotpotqa"]}}))
        paths.append(str(path))
    runs, averages = load_runs(paths)
    assert list(runs) == ["base", "trained"] and averages == {"qa": ["hotpotqa"]}
    text = paper_main(paths)
    assert text in capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:]] == ["base", "trained"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad.json: not a test_benchmarks.json file"):
        load_runs([str(tmp_path / "bad.json")])
