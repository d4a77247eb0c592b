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
    "qasper": "qasper",
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
    "qasper": [  # one item per question; one reference per annotator, read as the official evaluator does
        ("q0001", ["TideSet, HarbourLog corpus", "TideSet and HarbourLog"]),  # spans joined; free form
        ("q0002", ["Yes", "No"]),  # yes_no true / false
        ("q0003", ["Unanswerable"]),
        ("q0004", ["with a detector followed by tracking"]),
        ("q0005", ["a detector with a tracking step"]),  # the first annotation sets no field: no reference
    ],
}
SKIPPED = {"qasper": ["q0006"]}  # its only annotation sets no field


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
    assert loaded.skipped == SKIPPED.get(name, [])
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


# ------------------------------------------------------------------------------------------ Qasper
def _release_layout(paper: dict) -> dict:
    """The hub row of one paper rewritten in the release JSON layout (lists of records)."""
    qas = paper["qas"]
    questions = []
    for q, question in enumerate(qas["question"]):
        answers = qas["answers"][q]
        questions.append(
            {
                "question": question,
                "question_id": qas["question_id"][q],
                "answers": [
                    {"answer": answer, "annotation_id": answers["annotation_id"][a], "worker_id": "w"}
                    for a, answer in enumerate(answers["answer"])
                ],
            }
        )
    sections = [
        {"section_name": name, "paragraphs": paragraphs}
        for name, paragraphs in zip(paper["full_text"]["section_name"], paper["full_text"]["paragraphs"], strict=True)
    ]
    return {"title": paper["title"], "abstract": paper["abstract"], "full_text": sections, "qas": questions}


def test_qasper_release_json_keyed_by_paper_gives_the_same_items(tmp_path: Path) -> None:
    papers = [json.loads(line) for line in (FIXTURES / "qasper.sample.jsonl").read_text().splitlines()]
    keyed = {paper["id"]: _release_layout(paper) for paper in papers}
    path = tmp_path / "qasper-dev-v0.3.json"
    path.write_text(json.dumps(keyed))
    release = load_benchmark("qasper", str(path))
    hub = _load("qasper")
    assert release.items == hub.items and release.skipped == hub.skipped == ["q0006"]
    assert len(load_benchmark("qasper", str(path), limit=1)) == 3  # limit counts papers


def test_qasper_context_is_the_paper_and_a_paper_without_questions_is_skipped(tmp_path: Path) -> None:
    item = _load("qasper").items[0]
    # title, abstract, then "section\nparagraph..." blocks; the empty paragraph and the unnamed empty
    # section are dropped
    assert item["context"].split("\n\n") == [
        "Parsing Tide Tables with Small Models",
        "We parse tide tables with small sequence models and release the TideSet corpus.",
        "Introduction\nTide tables are semi-structured.",
        "Experiments\nWe train on TideSet and the HarbourLog corpus.\nFLOAT SELECTED: Table 1: Accuracy per port.",
    ]
    path = tmp_path / "qasper.json"
    path.write_text(json.dumps({"2001.9": {"title": "T", "abstract": "A", "full_text": [], "qas": []}}))
    assert load_benchmark("qasper", str(path)).skipped == ["2001.9"]


def test_qasper_scores_the_best_token_f1_over_the_references() -> None:
    from lit_gcpo.evaluation.grading import grade_completion

    gold = _load("qasper").items[0]["gold"]  # ["TideSet, HarbourLog corpus", "TideSet and HarbourLog"]
    # "HarbourLog corpus" vs the first: 2 common tokens, P 1, R 2/3 -> F1 0.8; vs the second: 1 common,
    # P 1/2, R 1/3 -> 0.4. The best is 0.8.
    grade = grade_completion("qa", "\\boxed{HarbourLog corpus}", gold)
    assert grade.f1 == pytest.approx(0.8) and not grade.correct
    assert grade_completion("qa", "\\boxed{unanswerable}", ["Unanswerable"]).correct
    assert grade_completion("qa", "\\boxed{no}", ["Yes", "No"]).f1 == 1.0
