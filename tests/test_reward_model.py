"""A learned reward model (``lit_gcpo.rewards.RewardModel``) as a reward: its scores equal a plain loop over each
(prompt, completion) alone, whatever the batch size and padding side; its texts are the ones written by hand; a
model with another label count is refused; it combines with reward functions by weight; ``lit-gcpo fit`` trains on
its scores; label-free training allows it; a checkpoint records it as the config gives it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import Namespace
from transformers import LlamaForSequenceClassification

from lit_gcpo.algorithms.label_free import TTRL
from lit_gcpo.assets.tiny_model import VOCAB, build_char_tokenizer, build_tiny_config
from lit_gcpo.data.label_free import label_free_problem
from lit_gcpo.rewards import RewardModel, RewardSet, reward_name
from lit_gcpo.rewards.reward_model import reward_setting
from lit_gcpo.running.cli import main

REPO = Path(__file__).parents[1]
# the user turn in parentheses, then "=", the answer and EOS: characters of the tiny vocabulary only
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}({{ m['content'] }})={% else %}{{ m['content'] }}</s>"
    "{% endif %}{% endfor %}"
)
PROMPTS = ["1+2=", "7*8=", "9-4=", "3+3=", "12*4=", "5-9="]
COMPLETIONS = ["3", "\\boxed{56}", "5 5 5 5 5 5 5", "", "48.0", "\\boxed{-4}"]


def build_reward_model(
    path: Path, num_labels: int = 1, chat_template: str | None = None, seed: int = 0, architecture: str = "llama"
) -> str:
    """A random 2-layer ``LlamaForSequenceClassification`` (rotary positions) or ``GPT2ForSequenceClassification``
    (absolute positions: left padding would shift them) over the character vocabulary, with its tokenizer
    (``pad_token_id`` set: the head finds each text's last token by it), saved to ``path``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = build_char_tokenizer()
    if architecture == "llama":
        config = build_tiny_config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    else:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
        config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config.num_labels, config.initializer_range = num_labels, 0.3  # scores spread over about +-1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (
            LlamaForSequenceClassification(config) if architecture == "llama" else GPT2ForSequenceClassification(config)
        )
    model.save_pretrained(path)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    return build_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def chat_rm_dir(tmp_path_factory) -> str:
    return build_reward_model(tmp_path_factory.mktemp("rm-chat"), chat_template=CHAT_TEMPLATE)


def loop_scores(path: str, texts: list[str], keep_last: int | None = None) -> list[float]:
    """The reference: each text tokenized alone (its last ``keep_last`` tokens) and scored alone, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"][-keep_last if keep_last else 0 :]
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return scores


@pytest.fixture(scope="module")
def gpt2_rm_dir(tmp_path_factory) -> str:
    return build_reward_model(tmp_path_factory.mktemp("rm-gpt2"), architecture="gpt2")


@pytest.mark.parametrize("batch_size", [1, 4, 8])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_scores_equal_each_text_scored_alone(rm_dir, gpt2_rm_dir, batch_size, padding_side, architecture):
    rm_dir = rm_dir if architecture == "llama" else gpt2_rm_dir
    rm = RewardModel(rm_dir, name="rm", batch_size=batch_size)
    rm.load("cpu")
    rm.tokenizer.padding_side = padding_side  # the tokenizer's own side: the scores must not depend on it
    expected = loop_scores(rm_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert max(expected) - min(expected) > 0.05  # distinct scores: a score given to the wrong text would show
    torch.testing.assert_close(torch.tensor(rm(PROMPTS, COMPLETIONS)), torch.tensor(expected), atol=1e-5, rtol=0)
    assert rm.last_metrics == {"truncated": 0.0}


def test_chat_template_and_plain_texts(chat_rm_dir, rm_dir):
    chat = RewardModel(chat_rm_dir)  # format auto: the tokenizer has a template
    chat.load("cpu")
    assert chat.texts(["1+2=", "7*8="], ["3", "56"]) == ["(1+2=)=3</s>", "(7*8=)=56</s>"]
    plain = RewardModel(chat_rm_dir, format="plain")
    plain.load("cpu")
    assert plain.texts(["1+2=", "7*8="], ["3", "56"]) == ["1+2=3", "7*8=56"]
    field = RewardModel(chat_rm_dir, prompt_field="question")  # the row's question instead of the policy's prompt
    field.load("cpu")
    assert field.texts(["<policy markup>1+2="], ["3"], question=["1+2"]) == ["(1+2)=3</s>"]
    # the chat text is scored as tokenized (no special tokens added on top of the template's)
    expected = loop_scores(chat_rm_dir, ["(1+2=)=3</s>", "(7*8=)=56</s>"])
    torch.testing.assert_close(
        torch.tensor(chat(["1+2=", "7*8="], ["3", "56"])), torch.tensor(expected), atol=1e-5, rtol=0
    )
    without = RewardModel(rm_dir, format="chat")
    with pytest.raises(ValueError, match="format 'chat' but its tokenizer has no chat template"):
        without.load("cpu")


def test_prompt_field_missing_from_the_rows_is_an_error_naming_it(chat_rm_dir):
    rm = RewardModel(chat_rm_dir, prompt_field="problem")
    rm.load("cpu")
    with pytest.raises(ValueError, match="prompt_field 'problem' is not a row field"):
        rm.texts(["1+2="], ["3"], answer=["3"])


def test_a_model_with_two_labels_is_refused_naming_the_option_and_the_count(tmp_path):
    path = build_reward_model(tmp_path / "classifier", num_labels=2)
    with pytest.raises(
        ValueError, match=r"data.rewards: the reward model 'classifier' .* has num_labels 2; .*num_labels 1"
    ):
        RewardModel(path)


def test_long_texts_are_truncated_counted_and_warned_about(rm_dir, caplog):
    rm = RewardModel(rm_dir, name="rm", max_length=4, batch_size=3)
    rm.load("cpu")
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    longer = sum(len(text) > 4 for text in texts)  # one token per character; "\\boxed{" is one token
    with caplog.at_level(logging.WARNING, logger="lit_gcpo.rewards.reward_model"):
        scores = rm(PROMPTS, COMPLETIONS)
    assert rm.last_metrics == {"truncated": float(longer)} and longer == 5  # "3+3=" alone fits
    assert "longer than max_length 4 tokens" in caplog.text
    # left truncation keeps the last 4 tokens: the end of the completion, where the head reads
    torch.testing.assert_close(
        torch.tensor(scores), torch.tensor(loop_scores(rm_dir, texts, keep_last=4)), atol=1e-5, rtol=0
    )
    right = RewardModel(rm_dir, max_length=4, truncation_side="right")
    right.load("cpu")
    first = [float(right.model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in
             [right.tokenizer(t)["input_ids"][:4] for t in texts]]  # fmt: skip
    torch.testing.assert_close(torch.tensor(right(PROMPTS, COMPLETIONS)), torch.tensor(first), atol=1e-5, rtol=0)


def test_combined_with_a_function_by_weights_is_the_weighted_sum(rm_dir):
    rm = RewardModel(rm_dir, name="rm", batch_size=4)
    rm.load("cpu")
    rewards = RewardSet.from_names(["format", rm], weights=[0.5, 2.0])
    scores = rewards.score(PROMPTS, COMPLETIONS, [{"answer": "1"}] * len(PROMPTS))
    boxed = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # format: a complete, non-empty box
    model = torch.tensor(loop_scores(rm_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]))
    torch.testing.assert_close(scores.components["format"], boxed)
    torch.testing.assert_close(scores.components["rm"], model, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.total, 0.5 * boxed + 2.0 * model, atol=1e-5, rtol=0)
    assert scores.metrics["reward/rm_truncated"] == 0.0 and scores.metrics["reward/rm_failures"] == 0.0


def test_label_free_training_allows_a_reward_model_and_compares_its_name(rm_dir):
    rm = RewardModel(rm_dir, name="rm")
    assert label_free_problem(TTRL(), [rm], "math_accuracy") is None  # an RM reads no gold
    assert "math_accuracy" in label_free_problem(TTRL(), [rm, "math_accuracy"], None)  # a gold reader is refused
    parsed = {"class_path": "lit_gcpo.rewards.RewardModel", "init_args": {"path": rm_dir, "name": None}}  # as parsed
    assert reward_name(parsed) == Path(rm_dir).name and label_free_problem(TTRL(), [parsed], "x") is None
    namespace = Namespace(class_path="lit_gcpo.rewards.RewardModel", init_args=Namespace(path=rm_dir, name="judge"))
    assert reward_name(namespace) == "judge" and "is one of" in label_free_problem(TTRL(), [namespace], "judge")
    assert "is one of data.rewards" in label_free_problem(TTRL(), [rm], "rm")


class LastBatch(L.Callback):
    batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LastBatch.batch = batch


def test_fit_trains_on_the_reward_models_scores(rm_dir, tmp_path, monkeypatch):
    """Two steps of the quickstart with ``math_accuracy_final`` + 0.5 x the reward model: the trained batch's
    rewards are that weighted sum of the plain loop's scores, and ``reward/rm_mean`` is their mean."""
    monkeypatch.chdir(REPO)
    LastBatch.batch = None
    spec = {"class_path": "lit_gcpo.rewards.RewardModel", "init_args": {"path": rm_dir, "name": "rm", "batch_size": 5}}
    cli = main(
        ["fit", "--config", "configs/quickstart.yaml",
         "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
         "--trainer.enable_progress_bar", "false", "--trainer.callbacks+", "test_reward_model.LastBatch",
         "--data.batch_size", "4", "--data.group_size", "4", "--data.val.init_args.num_val", "8",
         "--data.val_batch_size", "8", "--model.warmup_steps", "0", "--model.export_dir", "null",
         "--data.rewards", json.dumps(["math_accuracy_final", spec]), "--data.reward_weights", "[1.0, 0.5]"]
    )  # fmt: skip
    batch, logged = LastBatch.batch, cli.trainer.logged_metrics
    texts = [batch.prompts[int(g)] + c for g, c in zip(batch.group_ids, batch.completions, strict=True)]
    expected = torch.tensor(loop_scores(rm_dir, texts))  # [N]
    accuracy = batch.reward_components["math_accuracy_final"].cpu()
    torch.testing.assert_close(batch.reward_components["rm"].cpu(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.rewards.cpu(), accuracy + 0.5 * expected, atol=1e-5, rtol=0)
    assert float(logged["reward/rm_mean"]) == pytest.approx(float(expected.mean()), abs=1e-5)
    assert float(logged["reward/mean"]) == pytest.approx(float((accuracy + 0.5 * expected).mean()), abs=1e-5)
    assert float(logged["reward/rm_truncated"]) == 0.0 and math.isfinite(float(logged["train/loss"]))
    # the checkpoint (read weights-only, as a resume reads it) records the reward model as the config gives it
    from lit_gcpo.running.resume import compare_with_checkpoint

    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["RolloutDataModule"]["rewards"][1] == reward_setting(cli.datamodule.reward_names[1])
    assert compare_with_checkpoint(checkpoint, cli.config["fit"]) == ([], [])  # a resumed run: nothing differs
    other = cli.config["fit"].clone()
    other.data.rewards[1].init_args.max_length = 64
    assert "data.rewards" in compare_with_checkpoint(checkpoint, other)[1][0]  # a changed option is reported


@pytest.mark.slow
def test_each_ddp_rank_scores_its_own_completions(tiny_model_dir, rm_dir, tmp_path):
    """2 gloo ranks, one rollout each (2 optimizer steps of it): every rank loaded the reward model and its trained
    rewards are digit_fraction + the plain loop's scores of its own completions, which differ from the other's."""
    from test_ddp import run
    from toy_rewards import digit_fraction

    ranks = run(tiny_model_dir, tmp_path, devices=2, strategy="ddp", batch_size=3, max_steps=2, poison_rollout=None,
                reward_model=rm_dir)  # fmt: skip
    trained = [rank["trained"][0] for rank in ranks]
    assert trained[0]["prompts"] != trained[1]["prompts"]  # each rank its share of the prompts
    for batch in trained:
        group_ids = batch["group_ids"].tolist()
        prompts = [batch["prompts"][g] for g in group_ids]
        expected = torch.tensor(digit_fraction(prompts, batch["completions"])) + torch.tensor(
            loop_scores(rm_dir, [p + c for p, c in zip(prompts, batch["completions"], strict=True)])
        )
        torch.testing.assert_close(batch["rewards"].cpu(), expected, atol=1e-5, rtol=0)


def test_the_readme_reward_model_config_parses_as_written(tmp_path, capsys, monkeypatch):
    import re

    import yaml

    monkeypatch.chdir(REPO)
    block = next(
        b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S) if "RewardModel" in b
    )
    (tmp_path / "rewards.yaml").write_text(block)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "rewards.yaml"), "--print_config"]
        )
    assert exit_info.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["rewards"][0] == "math_accuracy_final" and data["reward_weights"] == [1.0, 0.5]
    model = data["rewards"][1]
    assert model["class_path"] == "lit_gcpo.rewards.RewardModel"
    assert model["init_args"] | {"path": None} == {
        "path": None, "tokenizer": None, "name": "skywork", "format": "auto", "prompt_field": None, "max_length": 4096,
        "truncation_side": "left", "batch_size": 16, "dtype": "auto",
    }  # fmt: skip
    assert model["init_args"]["path"] == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
