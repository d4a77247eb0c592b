"""``lit-gcpo test`` on local benchmark files, and the BenchmarkReport callback on hand-built batches."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from eval_cli import cli_test_args, source

from lit_gcpo.assets.tiny_model import build_char_tokenizer
from lit_gcpo.data.batch import RolloutBatch
from lit_gcpo.evaluation.callback import BenchmarkReport
from lit_gcpo.evaluation.sources import MATH_TEMPLATE, BenchmarkSource
from lit_gcpo.running.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
SAMPLES = 4


# --------------------------------------------------------------------------- independent recomputation
def _pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021 eq. 1 with binomials (the metric uses the product form)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _pairwise_auroc(scores: list[float | None], wrong: list[bool]) -> float:
    """P(score of a wrong item > score of a right one) + 1/2 P(tie), by a loop over all pairs."""
    pairs = [(s, w) for s, w in zip(scores, wrong, strict=True) if s is not None]
    positives = [s for s, w in pairs if w]
    negatives = [s for s, w in pairs if not w]
    if not positives or not negatives:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def _recompute(items: list[dict[str, Any]]) -> dict[str, float]:
    """The summary of one benchmark from its saved per-item grades, with plain Python."""
    n = len(items[0]["correct"])
    counts = [sum(item["correct"]) for item in items]
    values = {"items": float(len(items))}
    if items[0]["kind"] == "math":
        values[f"avg@{n}"] = sum(c / n for c in counts) / len(items)
        values[f"maj@{n}"] = sum(item["majority_correct"] for item in items) / len(items)
    else:
        values["em"] = sum(counts) / (n * len(items))
        values["f1"] = sum(f for item in items for f in item["f1"]) / (n * len(items))
    for k in (1, 2, 4):
        values[f"pass@{k}"] = sum(_pass_at_k(n, c, k) for c in counts) / len(items)
    wrong = [not item["majority_correct"] for item in items]
    for signal in ("se", "cd", "bot", "u_c"):
        values[f"auroc_{signal}"] = _pairwise_auroc([item["signals"][signal] for item in items], wrong)
    return values


def _assert_close(actual: dict[str, Any], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        got = actual[name]
        if math.isnan(value):
            assert got is None or math.isnan(got), name
        else:
            assert got == pytest.approx(value, abs=1e-9), name


# ------------------------------------------------------------------------------------- the CLI run
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _test_args(model_dir: str, math_file: str, qa_file: str, out: Path) -> list[str]:
    sources = [source("gsm8k", math_file), source("hotpotqa", qa_file, max_context_tokens=60)]
    return cli_test_args(model_dir, out, sources, samples=SAMPLES, max_new_tokens=10, batch_size=2)


def _check_outputs(out: Path, printed: str, logged: dict[str, Any]) -> dict[str, Any]:
    """The files agree with each other, with the log and with a recomputation from the saved grades."""
    document = json.loads((out / "test_benchmarks.json").read_text())
    summary, items = document["summary"], document["items"]
    assert list(summary) == ["gsm8k", "hotpotqa"]
    for benchmark, values in summary.items():
        mine = [item for item in items if item["benchmark"] == benchmark]
        assert all(len(item["completions"]) == SAMPLES for item in mine)
        _assert_close(values, _recompute(mine))
        for metric, value in values.items():  # the logged scalars are the same numbers
            expected = math.nan if value is None else value
            logged_value = float(logged[f"test/{benchmark}/{metric}"])
            assert (math.isnan(expected) and math.isnan(logged_value)) or logged_value == pytest.approx(expected)
        assert f"| {benchmark} " in printed and f"| {benchmark} " in (out / "test_table.md").read_text()
    with (out / "test_items.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["benchmark"], r["id"]) for r in rows] == [(i["benchmark"], i["id"]) for i in items]
    assert [json.loads(r["correct"]) for r in rows] == [i["correct"] for i in items]
    assert [json.loads(r["completions"]) for r in rows] == [i["completions"] for i in items]
    with (out / "test_summary.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            for metric, value in summary[row["benchmark"]].items():
                assert (row[metric] == "" and value is None) or float(row[metric]) == pytest.approx(value)
    return document


def test_cli_test_run_writes_table_json_csv_consistent_with_item_grades(
    tiny_model_dir, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(Path(__file__).parents[1])
    math_rows = _read_jsonl(FIXTURES / "gsm8k.sample.jsonl")
    math_rows.append({"question": "What is 1 + 1?", "answer": "two (no GSM8K final-answer mark: unreadable gold)"})
    qa_rows = _read_jsonl(FIXTURES / "hotpotqa_dev_distractor.sample.jsonl")
    math_file = _write_jsonl(tmp_path / "gsm8k.jsonl", math_rows)
    qa_file = _write_jsonl(tmp_path / "hotpotqa.jsonl", qa_rows)

    with caplog.at_level(logging.WARNING):
        cli = main(_test_args(tiny_model_dir, math_file, qa_file, tmp_path / "first"))
    document = _check_outputs(tmp_path / "first", capsys.readouterr().out, cli.trainer.callback_metrics)
    # The sixth GSM8K row has no "####" gold: reported by id, excluded, counted.
    assert document["skipped"] == {"gsm8k": ["gsm8k-5"], "hotpotqa": []}
    assert document["summary"]["gsm8k"]["skipped"] == 1 and document["summary"]["gsm8k"]["items"] == 5
    assert "gsm8k-5" not in [item["id"] for item in document["items"]]
    assert "gsm8k-5" in caplog.text
    qa_items = [item for item in document["items"] if item["kind"] == "qa"]
    assert [item["gold"] for item in qa_items] == [[row["answer"]] for row in qa_rows]

    # A random policy answers nothing right; to get non-trivial numbers, make the first QA item's gold
    # its first completion's answer and evaluate again: the generation is seeded, so the completions
    # are the same and that completion (at least) is now an exact match.
    item, sample = next((i, j) for i, it in enumerate(qa_items) for j, a in enumerate(it["answers"]) if a)
    qa_rows[item]["answer"] = qa_items[item]["answers"][sample]
    qa_file = _write_jsonl(tmp_path / "hotpotqa_rewritten.jsonl", qa_rows)
    cli = main(_test_args(tiny_model_dir, math_file, qa_file, tmp_path / "second"))
    second = _check_outputs(tmp_path / "second", capsys.readouterr().out, cli.trainer.callback_metrics)
    rewritten = [it for it in second["items"] if it["kind"] == "qa"][item]
    assert rewritten["completions"] == qa_items[item]["completions"]
    assert rewritten["correct"][sample] is True and rewritten["f1"][sample] == 1.0
    assert second["summary"]["hotpotqa"]["em"] > 0.0


# --------------------------------------------------------------------------- hand-built rollout batches
def _batch(rows: list[dict[str, Any]], completions: list[list[str]], embeddings: torch.Tensor | None) -> RolloutBatch:
    group_size = len(completions[0])
    flat = [text for group in completions for text in group]
    n = len(flat)
    return RolloutBatch(
        prompts=[f"prompt {row['id']}" for row in rows],
        rows=rows,
        completions=flat,
        input_ids=torch.zeros(n, 2, dtype=torch.long),
        attention_mask=torch.ones(n, 2, dtype=torch.long),
        completion_mask=torch.ones(n, 1),
        group_ids=torch.arange(len(rows)).repeat_interleave(group_size),
        rewards=torch.zeros(n),  # replaced below where the test needs reward dispersion
        embeddings=embeddings,
    )


def _math_batch() -> RolloutBatch:
    rows = [
        {"id": "A", "index": 0, "kind": "math", "benchmark": "toy", "gold": "4"},
        {"id": "B", "index": 1, "kind": "math", "benchmark": "toy", "gold": "\\frac{1}{2}"},
        {"id": "C", "index": 2, "kind": "math", "benchmark": "toy", "gold": "10"},
        {"id": "D", "index": 3, "kind": "math", "benchmark": "toy", "gold": "2"},
    ]
    completions = [
        ["so \\boxed{4}", "\\boxed{4}", "\\boxed{5}", "no box"],  # correct 1 1 0 0
        ["\\boxed{3}", "\\boxed{3}", "\\boxed{3}", "\\boxed{0.5}"],  # correct 0 0 0 1 (0.5 = 1/2)
        ["\\boxed{10}"] * 4,  # correct 1 1 1 1
        ["none", "none", "none", "none"],  # no answer at all
    ]
    generator = torch.Generator().manual_seed(0)
    batch = _batch(rows, completions, torch.randn(16, 5, generator=generator))
    batch.rewards = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    return batch


def test_callback_aggregates_pass_maj_and_auroc_as_derived_by_hand():
    records = BenchmarkReport().grade_batch(_math_batch())
    assert [r["correct"] for r in records] == [
        [True, True, False, False],
        [False, False, False, True],
        [True] * 4,
        [False] * 4,
    ]
    # Majority answers: A "4" (2 of 3 answers; "no box" does not vote) right; B "3" wrong; C right;
    # D has no answer, wrong.
    assert [(r["majority_answer"], r["majority_correct"]) for r in records] == [
        ("4", True),
        ("3", False),
        ("10", True),
        (None, False),
    ]
    # Discrete SE (no log-probs): A clusters {4,4},{5},{None}: -(.5 ln .5 + 2 x .25 ln .25) = 1.03972;
    # B {3,3,3},{0.5}: -(.75 ln .75 + .25 ln .25) = 0.56234; C one cluster: 0; D four singletons: ln 4.
    se = [r["signals"]["se"] for r in records]
    assert se == pytest.approx([1.0397208, 0.5623351, 0.0, math.log(4)], abs=1e-6)
    # Reward dispersion = population std / 0.5: A [1,1,0,0] -> 1; B [0,0,0,1] -> sqrt(3/16)/0.5 = 0.8660;
    # C, D constant -> 0. u_c = BoT (1 - RD).
    rd = [r["signals"]["rd"] for r in records]
    assert rd == pytest.approx([1.0, math.sqrt(3) / 2, 0.0, 0.0], abs=1e-6)
    for record in records:
        assert record["signals"]["u_c"] == pytest.approx(record["signals"]["bot"] * (1 - record["signals"]["rd"]))

    from lit_gcpo.evaluation.results import summarise

    values = summarise(records)["toy"]
    # c = 2, 1, 4, 0 of n = 4. avg@4 = (.5 + .25 + 1 + 0) / 4 = 0.4375 = pass@1.
    # pass@2 = 1 - C(n-c, 2)/C(4, 2): A 1 - 1/6 = 5/6, B 1 - 3/6 = 1/2, C 1, D 0 -> (5/6 + 1/2 + 1) / 4 = 7/12.
    # pass@4: A, B, C have a correct sample, D none -> 3/4. maj@4: A and C -> 1/2.
    assert values["avg@4"] == pytest.approx(0.4375)
    assert values["pass@1"] == pytest.approx(0.4375)
    assert values["pass@2"] == pytest.approx(7 / 12)
    assert values["pass@4"] == pytest.approx(0.75)
    assert values["maj@4"] == pytest.approx(0.5)
    # AUROC of SE for "majority wrong" (B, D) against right (A, C): pairs (B,A) 0.56 < 1.04 loses,
    # (B,C) wins, (D,A) wins, (D,C) wins -> 3/4.
    assert values["auroc_se"] == pytest.approx(0.75)
    wrong = [not r["majority_correct"] for r in records]
    for signal in ("cd", "bot", "u_c"):
        expected = _pairwise_auroc([r["signals"][signal] for r in records], wrong)
        assert values[f"auroc_{signal}"] == pytest.approx(expected), signal


def test_callback_grades_qa_by_exact_match_and_f1():
    rows = [
        {"id": "q1", "index": 0, "kind": "qa", "benchmark": "qa_toy", "gold": ["Paris", "City of Paris"]},
        {"id": "q2", "index": 1, "kind": "qa", "benchmark": "qa_toy", "gold": ["blue"]},
    ]
    batch = _batch(rows, [["\\boxed{paris}", "Answer: Paris France"], ["\\boxed{red}", "\\boxed{Blue.}"]], None)
    records = BenchmarkReport().grade_batch(batch)
    assert [r["answers"] for r in records] == [["paris", "Paris France"], ["red", "Blue."]]
    # "Paris France" vs "Paris": precision 1/2, recall 1 -> F1 2/3 (vs "City of Paris": 2/5).
    assert [r["f1"] for r in records] == [[1.0, pytest.approx(2 / 3)], [0.0, 1.0]]
    from lit_gcpo.evaluation.results import summarise

    values = summarise(records)["qa_toy"]
    assert values["em"] == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert values["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert values["pass@2"] == pytest.approx(1.0)  # one exact match in each pair
    # Majority: ties go to the first answer: q1 "paris" right, q2 "red" wrong.
    assert [r["majority_correct"] for r in records] == [True, False]


def test_callback_hooks_log_and_write_every_benchmark(tmp_path):
    logged: dict[str, float] = {}
    module = SimpleNamespace(log=lambda name, value, **kwargs: logged.__setitem__(name, value))
    trainer = SimpleNamespace(
        world_size=1, is_global_zero=True, datamodule=None, log_dir=str(tmp_path), default_root_dir=str(tmp_path)
    )
    callback = BenchmarkReport(pass_ks=[1, 3])
    callback.on_test_epoch_start(trainer, module)
    callback.on_test_batch_end(trainer, module, None, _math_batch(), 0, 0)
    callback.on_test_epoch_end(trainer, module)
    assert logged["test/toy/items"] == 4.0 and logged["test/toy/auroc_se"] == pytest.approx(0.75)
    # pass@3 = 1 - C(n-c, 3)/C(4, 3): A 1 (n-c = 2 < 3), B 1 - C(3,3)/C(4,3) = 3/4, C 1, D 0
    # -> (1 + 3/4 + 1 + 0) / 4 = 0.6875.
    assert logged["test/toy/pass@3"] == pytest.approx(0.6875)
    assert "test/toy/pass@2" not in logged
    saved = json.loads((tmp_path / "test_benchmarks.json").read_text())
    assert [item["id"] for item in saved["items"]] == ["A", "B", "C", "D"]
    assert saved["summary"]["toy"]["pass@3"] == pytest.approx(0.6875)


# -------------------------------------------------------------------------------------- the source
def test_benchmark_source_rows_templates_and_context_budget():
    math_source = BenchmarkSource("gsm8k", str(FIXTURES / "gsm8k.sample.jsonl"), limit=2)
    rows = math_source.load()
    assert [row["id"] for row in rows] == ["gsm8k-0", "gsm8k-1"]
    assert [row["gold"] for row in rows] == ["8", "5"]
    assert math_source.template == MATH_TEMPLATE and math_source.required_fields == ["prompt", "gold"]
    assert rows[0]["kind"] == "math" and rows[0]["context"] is None
    qa_source = BenchmarkSource(
        "hotpotqa", str(FIXTURES / "hotpotqa_dev_distractor.sample.jsonl"), max_context_tokens=7
    )
    with pytest.raises(RuntimeError, match="max_context_tokens needs a tokenizer"):
        qa_source.load()
    tokenizer = build_char_tokenizer()  # one token per character (no "\boxed{" in the contexts)
    qa_source.bind_tokenizer(tokenizer)
    whole = BenchmarkSource("hotpotqa", str(FIXTURES / "hotpotqa_dev_distractor.sample.jsonl")).load()
    cut = qa_source.load()
    assert [row["context"] for row in cut] == [row["context"][:7] for row in whole]
    assert "{context}" in qa_source.template and "{prompt}" in qa_source.template


def test_greedy_batch_reports_accuracy_and_no_uncertainty():
    rows = [{"id": str(i), "index": i, "kind": "math", "benchmark": "greedy", "gold": g} for i, g in enumerate("456")]
    batch = _batch(rows, [["\\boxed{4}"], ["\\boxed{7}"], ["\\boxed{6}"]], torch.ones(3, 2))
    records = BenchmarkReport().grade_batch(batch)
    # One completion per prompt: no uncertainty estimate (every signal but the cluster count undefined).
    assert all(value is None for r in records for name, value in r["signals"].items() if name != "num_clusters")
    from lit_gcpo.evaluation.results import summarise

    # 4 and 6 right, 7 wrong: accuracy 2/3; no pass@k, maj@k or AUROC with one sample. Every completion
    # is one token long (completion_mask [3, 1]); the batch has no truncation flags, so no truncated_frac.
    assert summarise(records) == {
        "greedy": {"items": 3.0, "skipped": 0.0, "accuracy": pytest.approx(2 / 3), "length_mean": 1.0}
    }
