"""Benchmark loaders on copies of the public sample records (tests/fixtures/benchmarks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lit_gcpo.evaluation import BENCHMARKS, load_benchmark
from lit_gcpo.rewards import math_accuracy, qa_exact_match

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
FILES = {
    "math500": "math500",
    "aime24": "aime24",
    "amc23": "amc23",
    "minerva_math": "minerva_math",
    "olympiadbench": "olympiadbench",
    "gsm8k": "gsm8k",
    "hotpotqa": "hotpotqa_dev_distractor",
    "narrativeqa": "narrativeqa",
}

# Golds read off the sample files by hand.
EXPECTED = {
    "math500": [
        ("test/intermediate_algebra/1981.json", "(2,12) \\cup (12,102)"),
        ("test/intermediate_algebra/1232.json", "\\frac{5}{13}"),
        ("test/geometry/561.json", "\\frac{7}{2}"),
        ("test/intermediate_algebra/1508.json", "-1"),
        ("test/geometry/615.json", "106^\\circ"),
    ],
    "aime24": [("85", "80"), ("86", "55"), ("87", "699"), ("88", "127"), ("89", "902")],  # "080" -> "80"
    "amc23": [("45", "4"), ("46", "6"), ("47", "901"), ("48", "144"), ("49", "8")],  # 4.0 -> "4"
    "minerva_math": [  # last \boxed{} of the solution
        ("267", "4.6e-24"),
        ("268", "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}"),
        ("269", "E_{1},E_{2}"),
        ("270", "24"),
        ("271", "10.1"),
    ],
    "olympiadbench": [("3098", "16"), ("3099", "10"), ("3100", "1"), ("3101", "14"), ("3102", "11")],
    "gsm8k": [("gsm8k-0", "8"), ("gsm8k-1", "5"), ("gsm8k-2", "230"), ("gsm8k-3", "5"), ("gsm8k-4", "14")],
    "hotpotqa": [
        ("5ae12d5355429920d52342eb", ["November 27, 2002."]),
        ("5a72ac8a5542992359bc3164", ["The Dundee Canal"]),
        ("5ae0bf3a55429906c02dab21", ["John Delaney"]),
    ],
    "narrativeqa": [
        ("narrativeqa-0", ["Servant", "Wanda's Servant"]),
        ("narrativeqa-1", ["Judgment Day", "Judgment day"]),  # reference whitespace stripped
        ("narrativeqa-2", ["His best friend", "his best friend"]),
    ],
}


def _load(name: str, **kwargs):
    return load_benchmark(name, str(FIXTURES / f"{FILES[name]}.sample.jsonl"), **kwargs)


def test_every_benchmark_is_registered() -> None:
    assert set(BENCHMARKS.names()) == set(FILES)
    with pytest.raises(ValueError, match="valid names: aime24, amc23"):
        load_benchmark("math5000", "unused.jsonl")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_ids_golds_and_kind(name: str) -> None:
    loaded = _load(name)
    assert [(item["id"], item["gold"]) for item in loaded.items] == EXPECTED[name]
    assert loaded.skipped == []
    kind = BENCHMARKS.get(name).kind
    for item in loaded.items:
        assert item["kind"] == kind and item["benchmark"] == name
        assert isinstance(item["question"], str) and item["question"]
        assert (item["context"] is None) == (kind == "math")


def test_hotpotqa_context_is_titled_paragraphs() -> None:
    item = _load("hotpotqa").items[0]
    paragraphs = item["context"].split("\n\n")
    assert len(paragraphs) == 10  # distractor setting: 10 titled paragraphs
    # the fixture keeps two sentences per paragraph; HotpotQA sentences carry their leading space
    assert paragraphs[1] == (
        "Treasure Planet: Treasure Planet is a 2002 American animated science fiction film produced by Walt "
        "Disney Feature Animation and released by Walt Disney Pictures on November 27, 2002. It is the 43rd "
        "Disney animated feature film."
    )


def test_narrativeqa_context_is_the_summary() -> None:
    item = _load("narrativeqa").items[0]
    assert item["question"] == "What role does Gregor take?"
    assert item["context"].startswith("The framing story concerns a man who dreams of speaking to Venus")


def test_items_feed_the_rewards_through_the_gold_column() -> None:
    math_items = _load("aime24").items
    completions = [f"\\boxed{{{int(item['gold']) + (i % 2)}}}" for i, item in enumerate(math_items)]
    scores = math_accuracy([""] * 5, completions, gold=[item["gold"] for item in math_items])
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]  # odd rows answer gold + 1
    qa_items = _load("narrativeqa").items
    scores = qa_exact_match(
        [""] * 3,
        ["Answer: servant", "Answer: doom", "Answer: HIS best friend"],
        gold=[item["gold"] for item in qa_items],
    )
    assert scores == [1.0, 0.0, 1.0]


def test_unreadable_rows_are_skipped_by_id_and_counted(tmp_path: Path, caplog) -> None:
    rows = [
        {"question": "ok", "answer": "work\n#### 1,234"},
        {"question": "no mark", "answer": "the answer is 7"},  # GSM8K gold needs ####
        {"question": "", "answer": "x\n#### 3"},  # no question
        {"question": "fine", "answer": "y\n#### 5"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        loaded = load_benchmark("gsm8k", str(path))
    assert [(i["id"], i["gold"]) for i in loaded.items] == [("gsm8k-0", "1234"), ("gsm8k-3", "5")]
    assert loaded.skipped == ["gsm8k-1", "gsm8k-2"]
    assert "2 of 4 rows" in caplog.text and "gsm8k-1, gsm8k-2" in caplog.text


def test_parquet_file_and_limit(tmp_path: Path) -> None:
    import datasets

    rows = [{"id": i, "problem": f"p{i}", "answer": float(i) if i != 2 else None} for i in range(4)]
    path = tmp_path / "amc.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = load_benchmark("amc23", str(path))
    assert [(i["id"], i["gold"]) for i in loaded.items] == [("0", "0"), ("1", "1"), ("3", "3")]
    assert loaded.skipped == ["2"]
    assert len(load_benchmark("amc23", str(path), limit=2)) == 2


def test_narrativeqa_hub_layout(tmp_path: Path) -> None:
    row = {
        "document": {"summary": {"text": "A story."}},
        "question": {"text": "Who?"},
        "answers": [{"text": "Her"}, {"text": " her "}],
    }
    path = tmp_path / "nqa.jsonl"
    path.write_text(json.dumps(row) + "\n")
    item = load_benchmark("narrativeqa", str(path)).items[0]
    assert (item["question"], item["context"], item["gold"]) == ("Who?", "A story.", ["Her", "her"])
