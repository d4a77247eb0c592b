"""``lit-gcpo predict``: a trained policy's completions of a prompt file, as JSON lines with their rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import _short_fit_args

from lit_gcpo.running.cli import main

PROMPTS = [
    {"prompt": "1+2=", "answer": "3"},
    {"prompt": "4*2=", "answer": "8"},
    {"prompt": "9-9="},  # no gold answer: no score, but still a prediction
]


def test_predict_writes_completions_with_rewards_where_gold_exists(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    args = [
        *_short_fit_args(tiny_model_dir, tmp_path, steps=1),
        "--data.predict.class_path",
        "lit_gcpo.data.sources.LocalFiles",
        "--data.predict.init_args.files",
        str(prompts),
        "--data.val_samples",
        "2",
        "--data.val_temperature",
        "1.0",
        "--data.val_batch_size",
        "2",
        "--data.rewards",
        "[toy_rewards:digit_fraction, math_accuracy]",
        "--data.accuracy_reward",  # the quickstart's is math_accuracy_final, not in this list
        "math_accuracy",
    ]
    cli = main(["predict", *args])
    output = Path(cli.trainer.log_dir) / "predictions.jsonl"
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 3 * 2  # every prompt, 2 samples each, over two batches (2 + 1 prompts)
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["prompt"] for r in records[::2]] == [row["prompt"] for row in PROMPTS]
    for record in records:
        completion = record["completion"]
        # the digit-fraction reward, recomputed here from the written completion
        expected = sum(ch.isdigit() for ch in completion) / len(completion) if completion else 0.0
        assert record["rewards"]["toy_rewards:digit_fraction"] == pytest.approx(expected, abs=1e-6)
        has_gold = record["row"].get("answer") is not None
        assert (record["rewards"]["math_accuracy"] is not None) == has_gold  # the third row has no gold: null
        assert record["correct"] == (None if not has_gold else record["rewards"]["math_accuracy"] == 1.0)
    # an existing output file is never overwritten
    with pytest.raises(FileExistsError, match=r"predictions\.jsonl exists"):
        main(
            [
                "predict",
                *args,
                "--trainer.callbacks+=lit_gcpo.running.prediction.PredictionWriter",
                f"--trainer.callbacks.output={output}",
            ]
        )


def test_help_says_what_lit_gcpo_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Lightning Trainer command line tool" not in text
    assert "lit-gcpo: uncertainty-aware reinforcement learning of language models" in text
    assert "`predict` writes a policy's completions of a prompt file" in text
