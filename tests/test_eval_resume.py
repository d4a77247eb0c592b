"""Resumable evaluation: a ``lit-gcpo test`` killed mid-run and restarted reports what an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_cli import FIXTURES, cli_test_args, source

from lit_gcpo.evaluation.callback import common_counts
from lit_gcpo.evaluation.progress import EvaluationProgress

RECORD = {"benchmark": "toy", "id": "a", "prompt": "the prompt", "signals": {"se": float("nan")}}


# ------------------------------------------------------------------------------- the progress file
def test_progress_round_trip_and_a_torn_last_line_is_dropped(tmp_path: Path, caplog) -> None:
    path = tmp_path / "test_progress.rank0.jsonl"
    progress = EvaluationProgress(path)
    progress.append("toy/greedy", [0, 1], {"samples": 1}, [RECORD])
    progress.append("toy/greedy", [2, 3], {"samples": 1}, [{**RECORD, "id": "b"}])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"name": "toy/greedy", "positions": [4')  # killed in the middle of a write
    again = EvaluationProgress(path)
    again.load()
    assert again.done() == {"toy/greedy": {(0, 1), (2, 3)}}
    assert [r["id"] for r in again.records()] == ["a", "b"]
    assert again.records()[0]["signals"] == {"se": None}  # NaN stored as null (strict JSON)
    assert path.read_bytes() == whole  # the torn line is cut, so the next append starts a fresh line
    assert "torn last line" in caplog.text
    again.append("toy/greedy", [4], {"samples": 1}, [{**RECORD, "id": "c"}])
    third = EvaluationProgress(path)
    third.load()
    assert [r["id"] for r in third.records()] == ["a", "b", "c"]


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    progress = EvaluationProgress(tmp_path / "p.jsonl")
    progress.append("toy", [0], {"samples": 4, "batch_size": 2}, [RECORD])
    progress.check({"toy": {"samples": 4, "batch_size": 2}})  # same settings: fine
    with pytest.raises(ValueError, match=r"'toy' was evaluated with other settings \(samples differ"):
        progress.check({"toy": {"samples": 8, "batch_size": 2}})
    with pytest.raises(ValueError, match=r"has results of 'toy', which this config does not evaluate"):
        progress.check({"other": {"samples": 4, "batch_size": 2}})
    same = {"toy": {"samples": 4, "batch_size": 2}}
    progress.check(same, {"toy": ["the prompt", "another"]})  # RECORD's prompt is at position 0
    with pytest.raises(ValueError, match=r"prompts of 'toy' at positions \[0\] are not the ones evaluated then"):
        progress.check(same, {"toy": ["an edited prompt", "another"]})
    with pytest.raises(ValueError, match=r"prompts of 'toy' at positions \[0\]"):
        progress.check(same, {"toy": []})  # fewer rows now (a smaller limit)


def test_ranks_keep_only_the_batches_every_rank_finished(tmp_path: Path) -> None:
    # a kill left rank 0 three batches into "a" and one into "b", rank 1 one batch into "a"
    rank0, rank1 = EvaluationProgress(tmp_path / "rank0.jsonl"), EvaluationProgress(tmp_path / "rank1.jsonl")
    for name, positions in [("a", [0, 2]), ("a", [4, 6]), ("a", [8]), ("b", [0, 2])]:
        rank0.append(name, positions, {"samples": 1}, [{**RECORD, "id": f"{name}{positions[0]}"}])
    rank1.append("a", [1, 3], {"samples": 1}, [{**RECORD, "id": "a1"}])
    common = common_counts([rank0.counts(), rank1.counts()])
    assert common == {"a": 1, "b": 0}
    assert rank0.keep_first(common) == 3 and rank1.keep_first(common) == 0
    for progress in (rank0, rank1):  # what a restarted rank reads back
        again = EvaluationProgress(progress.path)
        again.load()
        assert again.done() == {"a": {(0, 2) if progress is rank0 else (1, 3)}}
    assert [r["id"] for r in rank0.records()] == ["a0"]
    assert not list(tmp_path.glob(".*tmp*"))  # the rewrite left no temporary file


# --------------------------------------------------------------------------- a real killed run
def _command(model_dir: str, out: Path) -> list[str]:
    sources = [
        source("gsm8k", FIXTURES / "gsm8k.sample.jsonl", greedy=True, samples=3),
        source("hotpotqa", FIXTURES / "hotpotqa_dev_distractor.sample.jsonl", max_context_tokens=40),
    ]
    args = cli_test_args(model_dir, out, sources, samples=2, max_new_tokens=12, batch_size=1)
    return [sys.executable, "-c", "import sys; from lit_gcpo.running.cli import main; main(sys.argv[1:])", *args]


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_run_restarted_skips_what_is_done_and_reports_the_same(tiny_model_dir, tmp_path: Path) -> None:
    batches = 5 + 5 + 3  # batch size 1: gsm8k greedy, gsm8k sampled, hotpotqa
    reference = tmp_path / "uninterrupted"
    _run(_command(tiny_model_dir, reference), tmp_path)
    assert len(_lines(reference / "test_progress.rank0.jsonl")) == batches

    out = tmp_path / "interrupted"
    progress = out / "test_progress.rank0.jsonl"
    process = subprocess.Popen(
        _command(tiny_model_dir, out), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if progress.is_file() and progress.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "test_benchmarks.json").exists()  # no report: the run did not finish
    before = progress.read_bytes()
    finished = before[: before.rfind(b"\n") + 1]
    assert 4 <= finished.count(b"\n") < batches

    _run(_command(tiny_model_dir, out), tmp_path)
    lines = _lines(progress)
    keys = [(line["name"], tuple(line["positions"])) for line in lines]
    # every batch once: the batches written before the kill were skipped, not evaluated again
    assert len(keys) == len(set(keys)) == batches
    assert progress.read_bytes().startswith(finished)
    assert json.loads((out / "test_benchmarks.json").read_text()) == json.loads(
        (reference / "test_benchmarks.json").read_text()
    )
    assert (out / "test_paper.md").read_text() == (reference / "test_paper.md").read_text()


def _fsdp2_command(model_dir: str, out: Path) -> list[str]:
    sources = [
        source("gsm8k", FIXTURES / "gsm8k.sample.jsonl", greedy=True, samples=3),
        source("hotpotqa", FIXTURES / "hotpotqa_dev_distractor.sample.jsonl", max_context_tokens=40),
    ]
    args = cli_test_args(model_dir, out, sources, samples=2, max_new_tokens=12, batch_size=2)
    # `-m`: Lightning starts rank 1 by running this command line again
    return [sys.executable, "-m", "lit_gcpo.running.cli", *args, "--trainer.devices=2", "--trainer.strategy=fsdp2"]


def test_fsdp2_ranks_a_kill_left_apart_resume_in_step_and_report_the_same(tiny_model_dir, tmp_path: Path) -> None:
    """A kill can leave one rank batches ahead of another. Each forward pass of a sharded policy is a collective:
    had each rank skipped its own batches (4 on rank 0, 1 on rank 1 here), rank 1's extra batches would have no
    partner (without the agreement gloo aborted the run on mismatched collectives; NCCL would wait). The ranks
    agree on what they all finished, rank 0 evaluates 3 batches again, and the report equals an uninterrupted
    run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(_fsdp2_command(tiny_model_dir, reference), cwd=tmp_path, check=True, timeout=600, env=env)
    files = [f"test_progress.rank{rank}.jsonl" for rank in (0, 1)]
    # batches of 2 rows: gsm8k greedy and sampled 2 each per rank, hotpotqa 1 each
    assert [len(_lines(reference / name)) for name in files] == [5, 5]

    out = tmp_path / "interrupted"
    out.mkdir()
    for name, kept in zip(files, (4, 1), strict=True):  # rank 0 stopped in hotpotqa, rank 1 in gsm8k greedy
        lines = (reference / name).read_text().splitlines(keepends=True)
        (out / name).write_text("".join(lines[:kept]))
    subprocess.run(_fsdp2_command(tiny_model_dir, out), cwd=tmp_path, check=True, timeout=300, env=env)
    for name in files:  # every batch once, and rank 1's finished batch kept
        keys = [(line["name"], tuple(line["positions"])) for line in _lines(out / name)]
        expected = [(line["name"], tuple(line["positions"])) for line in _lines(reference / name)]
        assert sorted(keys) == sorted(expected)
    assert _lines(out / files[1])[0] == _lines(reference / files[1])[0]
    assert json.loads((out / "test_benchmarks.json").read_text()) == json.loads(
        (reference / "test_benchmarks.json").read_text()
    )
