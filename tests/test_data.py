"""Prompt sources, templates and the prompt stream of the rollout DataModule."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch

from lit_gcpo.assets.tiny_model import build_char_tokenizer
from lit_gcpo.data.batch import PromptBatch
from lit_gcpo.data.datamodule import EvalPrompts, PromptStream, RolloutDataModule
from lit_gcpo.data.rollout import pack_sequences, pad_right
from lit_gcpo.data.sources import HubDataset, LocalFiles
from lit_gcpo.data.templates import QWEN_MATH_TEMPLATE, PromptRenderer, fill
from lit_gcpo.tasks.arithmetic import ArithmeticTask

ROWS = [{"problem": f"{i}+1", "solution": str(i + 1)} for i in range(7)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_and_parquet_with_field_mapping(tmp_path):
    import pandas as pd

    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    fields = {"problem": "prompt", "solution": "answer"}
    expected = [{"prompt": r["problem"], "answer": r["solution"]} for r in ROWS]
    assert LocalFiles(jsonl, fields=fields).load() == expected
    assert LocalFiles(str(parquet), fields=fields).load() == expected
    assert LocalFiles(jsonl, fields=fields, limit=3).load() == expected[:3]


def test_hub_dataset_reads_a_local_dataset_directory(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    rows = HubDataset(str(folder), split="train", fields={"problem": "prompt"}).load()
    assert [r["prompt"] for r in rows] == [r["problem"] for r in ROWS]


def test_local_files_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported format '\.csv'"):
        LocalFiles(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        LocalFiles(str(tmp_path / "missing.jsonl")).load()


def test_arithmetic_splits_are_disjoint_and_deterministic():
    args = dict(num_train=300, num_val=50, mix={2: 1.0, 3: 1.0}, seed=4, disjoint=True)
    train = ArithmeticTask("train", **args).load()
    val = ArithmeticTask("validation", **args).load()
    assert len(train) == 300 and len(val) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert ArithmeticTask("train", **args).load() == train
    assert {r["level"] for r in train} == {2, 3}


def test_template_fills_fields_and_leaves_other_braces():
    text = fill(QWEN_MATH_TEMPLATE, {"prompt": "What is 1+1?"})
    assert text == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert fill("{a} and {b} in \\boxed{}", {"a": 1, "b": "x"}) == "1 and x in \\boxed{}"
    with pytest.raises(KeyError, match="b"):
        fill("{a} {b}", {"a": 1})


def test_renderer_uses_the_chat_template_when_the_tokenizer_has_one():
    tokenizer = build_char_tokenizer()
    assert PromptRenderer(tokenizer, "{prompt}=").render({"prompt": "1+2"}) == "1+2="
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    renderer = PromptRenderer(tokenizer, "{prompt}=", system="S")
    assert renderer.use_chat
    assert renderer.render({"prompt": "1+2"}) == "[system]S[user]1+2=[assistant]"
    assert PromptRenderer(tokenizer, "{prompt}=", chat="never").render({"prompt": "1+2"}) == "1+2="
    named = PromptRenderer(tokenizer, "qwen-math", chat="never").render({"prompt": "1+2"})
    assert named == "1+2\nPlease reason step by step, and put your final answer within \\boxed{}."


def _stream(rows, batch_size, seed, start=0, rank=0, world=1) -> PromptStream:
    stream = PromptStream(rows, [r["problem"] for r in rows], batch_size, seed, lambda: start)
    stream.rank, stream.world_size = rank, world
    return stream


def _take(stream, count) -> list[PromptBatch]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_prompt_stream_visits_every_row_once_per_epoch():
    batches = _take(_stream(ROWS, batch_size=7, seed=0), 3)
    for batch in batches:  # one batch = one epoch here
        assert sorted(batch.indices) == list(range(7))
    assert batches[0].indices != batches[1].indices  # reshuffled each epoch


def test_prompt_stream_resumes_at_the_next_batch():
    straight = _take(_stream(ROWS, batch_size=3, seed=5), 6)
    resumed = _take(_stream(ROWS, batch_size=3, seed=5, start=4), 2)
    assert [b.indices for b in resumed] == [b.indices for b in straight[4:6]]


def test_ranks_draw_disjoint_prompts_that_cover_the_single_process_order():
    single = _take(_stream(ROWS * 2, batch_size=2, seed=1), 4)
    rank0 = _take(_stream(ROWS * 2, batch_size=2, seed=1, rank=0, world=2), 2)
    rank1 = _take(_stream(ROWS * 2, batch_size=2, seed=1, rank=1, world=2), 2)
    interleaved = [rank0[0], rank1[0], rank0[1], rank1[1]]
    assert [b.indices for b in interleaved] == [b.indices for b in single]


def test_eval_prompts_shard_by_rank_without_overlap():
    shards = []
    for rank in range(3):
        dataset = EvalPrompts(ROWS, [r["problem"] for r in ROWS], batch_size=2)
        dataset.rank, dataset.world_size = rank, 3
        shards.append([i for batch in dataset for i in batch.indices])
    assert sorted(i for shard in shards for i in shard) == list(range(7))


@pytest.mark.parametrize(("rows", "world", "batch_size"), [(5, 2, 2), (7, 3, 2), (164 + 165 * 7, 8, 41), (9, 4, 3)])
def test_every_rank_runs_the_same_number_of_eval_batches(rows, world, batch_size):
    # 1319 GSM8K rows over 8 ranks in batches of 41: ranks of 165 rows need 5 batches, the rank of 164 rows 4 as
    # plain slices; under fsdp2 the other ranks would wait for its fifth forward pass forever
    table = [{"problem": str(i)} for i in range(rows)]
    shards = []
    for rank in range(world):
        dataset = EvalPrompts(table, [r["problem"] for r in table], batch_size=batch_size)
        dataset.rank, dataset.world_size = rank, world
        shards.append([batch.indices for batch in dataset])
    most = -(-rows // world)
    assert {len(batches) for batches in shards} == {-(-most // batch_size)}
    assert all(1 <= len(batch) <= batch_size for batches in shards for batch in batches)
    for rank, batches in enumerate(shards):  # each rank's rows in order, every row once over all ranks
        assert [i for batch in batches for i in batch] == list(range(rank, rows, world))


def test_a_single_process_keeps_full_batches_and_a_short_last_one():
    dataset = EvalPrompts(ROWS, [r["problem"] for r in ROWS], batch_size=3)
    assert dataset.batches() == [[0, 1, 2], [3, 4, 5], [6]]


def test_an_even_split_that_cannot_be_made_is_an_error_under_fsdp2_only():
    dataset = EvalPrompts(ROWS, [r["problem"] for r in ROWS], batch_size=1)
    dataset.rank, dataset.world_size = 1, 2  # 7 rows: rank 0 has 4 batches of one row, rank 1 only 3 rows
    assert dataset.batches() == [[1], [3], [5]]  # DDP: no collective in a forward pass, a batch fewer is fine
    dataset.lockstep = True
    with pytest.raises(ValueError, match=r"rank 1 has 3 rows for 4 batches.*val_batch_size"):
        dataset.batches()


def test_rows_missing_a_field_are_skipped_and_counted(tmp_path, caplog):
    rows = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2="},
        {"prompt": "", "answer": "1"},
        {"prompt": "3+3=", "answer": "6"},
    ]
    data = RolloutDataModule(train=LocalFiles(write_jsonl(tmp_path / "r.jsonl", rows)))
    renderer = PromptRenderer(build_char_tokenizer(), data.template)
    with caplog.at_level(logging.WARNING):
        kept_rows, prompts = data._prepare("train", data.train_source, renderer)
    assert prompts == ["1+1=", "3+3="]
    assert [r["answer"] for r in kept_rows] == ["2", "6"]
    assert data.skipped_rows["train"] == 2
    assert "row 1 lacks ['answer']" in caplog.text and "row 2 lacks ['prompt']" in caplog.text


def test_a_field_missing_from_every_row_is_an_error_naming_it(tmp_path):
    rows = [{"question": "1+1=", "answer": "2"}]
    data = RolloutDataModule(train=LocalFiles(write_jsonl(tmp_path / "r.jsonl", rows)))
    renderer = PromptRenderer(build_char_tokenizer(), data.template)
    with pytest.raises(ValueError, match=r"field 'prompt' is missing from every row.*\['answer', 'question'\]"):
        data._prepare("train", data.train_source, renderer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"rewards": ["math_accuracy"], "reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries for 1"),
        ({"rewards": ["qa_f1"], "accuracy_reward": "math_accuracy"}, "accuracy_reward 'math_accuracy' is not one"),
    ],
)
def test_invalid_datamodule_arguments_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutDataModule(**kwargs)


def test_an_empty_or_broken_jsonl_is_an_error_naming_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"files: .*empty\.jsonl is empty \(no rows\)"):
        LocalFiles(str(empty)).load()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1", "answer": "2"}\n\n{"prompt": "2+2", "answer": 4\n{"prompt": "3"}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: not valid JSON \(Expecting ',' delimiter"):
        LocalFiles(str(broken)).load()
    listed = tmp_path / "listed.jsonl"
    listed.write_text('{"prompt": "1"}\n["2", "3"]\n')
    with pytest.raises(ValueError, match=r"listed\.jsonl, line 2: a row must be a JSON object, got list"):
        LocalFiles(str(listed)).load()
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"hub\[train\] has an empty data file"):
        HubDataset(str(folder)).load()


def test_a_file_that_is_not_utf8_is_an_error_naming_the_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"  # saved by an editor as Latin-1: "é" is the single byte 0xe9
    latin1.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9?", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        LocalFiles(str(latin1)).load()
    gzipped = tmp_path / "rows.jsonl"  # compressed, with its name unchanged
    gzipped.write_bytes(gzip.compress(b'{"prompt": "1+1", "answer": "2"}\n' * 200))
    with pytest.raises(ValueError, match=r"rows\.jsonl, line 1: not UTF-8 text .* a binary or compressed file\?"):
        LocalFiles(str(gzipped)).load()
    document = tmp_path / "rows.json"  # a JSON document: read by datasets after the same check
    document.write_bytes(b'[{"prompt": "1+1",\n  "answer": "\xff"}]')
    with pytest.raises(ValueError, match=r"rows\.json, line 2: not UTF-8 text \(byte 0xff at column 14\)"):
        LocalFiles(str(document)).load()


def test_a_line_separator_inside_a_json_string_is_not_a_new_row(tmp_path):
    rows = [{"prompt": "a\u2028b", "answer": "1"}, {"prompt": "c", "answer": "2"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert LocalFiles(str(path)).load() == rows


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": 7, "answer": "7"}, r"field 'prompt' has type int \(7\), it must be text"),
        ({"prompt": ["1+1", "2+2"], "answer": "2"}, r"field 'prompt' has type list \(\['1\+1', '2\+2'\]\)"),
        (
            {"prompt": "1+1", "answer": {"value": 2}},
            r"field 'answer' has type dict \(\{'value': 2\}\), it must be an answer",
        ),
        ({"prompt": "1+1", "answer": True}, r"field 'answer' has type bool \(True\)"),
        ({"prompt": "1+1", "answer": [{"x": 1}]}, r"field 'answer' has type list"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_file_line_and_field(tmp_path, row, message):
    good = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": 4}, {"prompt": "3+3", "answer": ["6", "six"]}]
    path = write_jsonl(tmp_path / "r.jsonl", [*good, row, *good])
    data = RolloutDataModule(train=LocalFiles(path))
    renderer = PromptRenderer(build_char_tokenizer(), data.template)
    with pytest.raises(
        ValueError, match=rf"r\.jsonl, line 4: {message}.*\(1 of 7 rows have a field of the wrong type\)"
    ):
        data._prepare("train", data.train_source, renderer)


def test_readable_golds_of_every_kind_pass_the_type_check_and_renamed_fields_name_their_column(tmp_path):
    rows = [
        {"problem": "q", "answer": "2"},
        {"problem": "q", "answer": 2.5},
        {"problem": "q", "answer": ["$69$,$84$"]},  # OlympiadBench
        {"problem": "q", "answer": {"text": ["Paris"], "answer_start": [3]}},  # SQuAD
        {"problem": "q", "answer": None},  # missing: skipped and counted, as before
    ]
    data = RolloutDataModule(train=LocalFiles(write_jsonl(tmp_path / "r.jsonl", rows), fields={"problem": "prompt"}))
    renderer = PromptRenderer(build_char_tokenizer(), data.template)
    kept_rows, _ = data._prepare("train", data.train_source, renderer)
    assert len(kept_rows) == 4 and data.skipped_rows["train"] == 1
    bad = LocalFiles(
        write_jsonl(tmp_path / "bad.jsonl", [{"problem": 12, "answer": "2"}]), fields={"problem": "prompt"}
    )
    data = RolloutDataModule(train=bad)
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: field 'prompt' \(column 'problem'\) has type int"):
        data._prepare("train", data.train_source, renderer)


def _fit_one_step(model_dir: str, rows: list[dict], tmp_path, **options) -> RolloutDataModule:
    import lightning as L

    from lit_gcpo.engines.base import SamplingConfig
    from lit_gcpo.training.module import GRPOModule

    data = RolloutDataModule(
        train=LocalFiles(write_jsonl(tmp_path / "rows.jsonl", rows)),
        batch_size=2,
        group_size=2,
        rewards=["format"],
        accuracy_reward=None,
        sampling=SamplingConfig(max_new_tokens=6),
        **options,
    )
    module = GRPOModule(model=model_dir, export_dir=None, log_samples_every_n_steps=0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    return data


# the tiny model's context is 256 positions; with 6 new tokens a prompt may have 250 (one token per character)
LONG_ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "1+" * 130 + "1=", "answer": "131"},  # 262 tokens
    {"prompt": "2+2=", "answer": "4"},
]


def test_prompts_longer_than_the_context_can_be_refused(tiny_model_dir, tmp_path):
    refused = r"train: .*rows\.jsonl: 1 of 3 prompts are longer than the 250 tokens.*row 1: 262"
    with pytest.raises(ValueError, match=refused):
        _fit_one_step(tiny_model_dir, LONG_ROWS, tmp_path, long_prompts="error")


def test_prompts_longer_than_the_context_are_skipped_or_truncated_and_counted(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        skipped = _fit_one_step(tiny_model_dir, LONG_ROWS, tmp_path, long_prompts="skip")
    assert skipped.long_prompt_rows["train"] == 1
    assert skipped._datasets["train"][1] == ["1+1=", "2+2="]
    assert "train: " in caplog.text and "rows.jsonl: 1 of 3 prompts are longer than the 250" in caplog.text
    assert "(row 1: 262 tokens); skipped" in caplog.text
    truncated = _fit_one_step(tiny_model_dir, LONG_ROWS, tmp_path)  # the default
    prompts = truncated._datasets["train"][1]
    assert prompts[1] == LONG_ROWS[1]["prompt"][-250:] and truncated.long_prompt_rows["train"] == 1


def test_engine_state_travels_with_the_datamodule_state():
    """The vllm engine's ``sync_every`` phase (its count of sync calls) is part of the checkpoint state."""
    from types import SimpleNamespace

    from lit_gcpo.data.datamodule import RolloutDataModule
    from lit_gcpo.tasks.arithmetic import ArithmeticTask

    class Engine:
        def __init__(self) -> None:
            self.calls = 0

        def state_dict(self):
            return {"sync_calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["sync_calls"]

    saved = RolloutDataModule(train=ArithmeticTask("train", num_train=8, num_val=2))
    saved.collector = SimpleNamespace(engine=Engine())
    saved.collector.engine.calls = 5
    saved.consumed_batches = 7
    restored = RolloutDataModule(train=ArithmeticTask("train", num_train=8, num_val=2))
    restored.collector = SimpleNamespace(engine=Engine())
    restored.load_state_dict(saved.state_dict())
    assert restored.collector.engine.calls == 5 and restored.consumed_batches == 7


@pytest.mark.parametrize(("strategy", "raises"), [("fsdp2", True), ("ddp", False)])
def test_the_dataloader_checks_the_split_when_the_strategy_needs_lockstep(strategy, raises):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from lit_gcpo.training.parallel import FSDP2Strategy

    data = RolloutDataModule(train=LocalFiles("unused.jsonl"))
    data.trainer = SimpleNamespace(
        global_rank=1, world_size=2, strategy=FSDP2Strategy() if strategy == "fsdp2" else DDPStrategy()
    )
    dataset = EvalPrompts(ROWS, [r["problem"] for r in ROWS], batch_size=1)
    if raises:  # when the dataloader is made, before any rank could wait for another
        with pytest.raises(ValueError, match="val_batch_size"):
            data._shard(dataset)
    else:
        assert [batch.indices for batch in data._shard(dataset)] == [[1], [3], [5]]


def test_pack_sequences_and_pad_right_by_hand():
    # prompts of 2, 1 and 0 tokens (left-padded to P = 2); completions of 0, 3 and 1 tokens (right-padded to L = 3)
    input_ids, attention_mask, mask = pack_sequences([[5, 6], [7], []], [[], [1, 2, 3], [4]], 0, torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 0, 0, 0], [0, 7, 1, 2, 3], [0, 0, 4, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert mask.tolist() == [[0, 0, 0], [1, 1, 1], [1, 0, 0]] and mask.dtype == torch.float32
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert pad_right([[], [0.5, -1.0, 2.0], [3.0]], mask).tolist() == [[0, 0, 0], [0.5, -1, 2], [3, 0, 0]]
    input_ids, _, mask = pack_sequences([[5]], [[]], 9, torch.device("cpu"))  # nothing sampled: one padded column
    assert input_ids.tolist() == [[5, 9]] and mask.tolist() == [[0]]
