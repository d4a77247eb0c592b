"""The quickstart's settings: it cannot learn to pad (issue 11), and its length limit fits its task mix.

A 500-step run of the quickstart with ``math_accuracy`` learned completions like ``\\boxed{6}0}000...`` that
fill the length limit: the reward read the box and ignored the junk. Now sampling stops at the box's closing
brace (``data.sampling.stop``, which validation shares) and the reward, ``math_accuracy_final`` for training
and validation, scores any text after the box 0.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_gcpo.assets.tiny_model import TINY_MODEL_PATH
from lit_gcpo.data.batch import PromptBatch
from lit_gcpo.data.rollout import RolloutCollector
from lit_gcpo.engines.base import Generation, SamplingConfig
from lit_gcpo.engines.hf import HFEngine
from lit_gcpo.rewards import RewardSet, math_accuracy, math_accuracy_final
from lit_gcpo.rewards.answers import ends_with_box
from lit_gcpo.tasks.arithmetic import ArithmeticProblem

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{6}", True),
        ("3+8-5=11-5=\\boxed{6}", True),
        ("\\boxed{6}  \n", True),  # trailing whitespace is not junk
        ("\\boxed{\\frac{1}{2}}", True),  # nested braces inside the box
        ("\\boxed{1}\\boxed{6}", True),  # the last box ends the text
        ("\\boxed{6}0}0000", False),  # the padding a 500-step run learned: the box closes before the end
        ("\\boxed{6}0", False),
        ("\\boxed{6}}", False),  # a stray brace after the box
        ("\\boxed{6", False),  # left open (truncated)
        ("6}", False),  # no box at all
        ("", False),
    ],
)
def test_ends_with_box(text: str, expected: bool) -> None:
    assert ends_with_box(text) is expected


def test_math_accuracy_final_scores_junk_after_the_box_zero() -> None:
    completions = ["\\boxed{6}", "\\boxed{6}0}000000", "4+2=\\boxed{6}\n", "\\boxed{7}", "\\boxed{6}"]
    columns = {"answer": ["6", "6", "6", "6", None]}
    # math_accuracy reads the last complete box only, so it paid the padded completion (row 1) in full
    assert math_accuracy([""] * 5, completions, **columns) == [1.0, 1.0, 1.0, 0.0, None]
    assert math_accuracy_final([""] * 5, completions, **columns) == [1.0, 0.0, 1.0, 0.0, None]


class _ScriptedEngine:
    """Returns fixed completions (token ids) in place of sampling: the rollout and the rewards are what is tested."""

    samples_from_policy = True

    def __init__(self, completion_ids: list[list[int]], truncated: list[bool]) -> None:
        self.completion_ids, self.truncated = completion_ids, truncated

    def generate(self, prompt_ids, num_samples, sampling, seeds=None) -> Generation:
        assert len(prompt_ids) * num_samples == len(self.completion_ids)
        return Generation(self.completion_ids, None, self.truncated)


def test_quickstart_rollout_does_not_reward_a_padded_completion() -> None:
    config = yaml.safe_load(QUICKSTART.read_text())["data"]
    # the training reward and the validation accuracy are both the strict one
    assert config["rewards"] == ["math_accuracy_final"]
    assert config["accuracy_reward"] == "math_accuracy_final"
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    # "\\boxed{" is one token of the tiny vocabulary, so "\\boxed{6}0}" is 5 tokens; zeros fill the limit
    junk = "\\boxed{6}0}" + "0" * (config["sampling"]["max_new_tokens"] - 5)
    clean = tokenizer("\\boxed{6}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    padded = tokenizer(junk, add_special_tokens=False)["input_ids"]
    assert len(padded) == config["sampling"]["max_new_tokens"]  # the padded completion hits the limit
    engine = _ScriptedEngine([clean, padded], truncated=[False, True])
    collector = RolloutCollector(engine, tokenizer, RewardSet.from_names(config["rewards"]))
    batch = PromptBatch(prompts=["3+4-1="], rows=[{"prompt": "3+4-1=", "answer": "6", "level": 3}], indices=[0])
    rollout = collector.collect(batch, 2, SamplingConfig(**config["sampling"]), torch.device("cpu"))
    assert rollout.completions == ["\\boxed{6}", junk]
    torch.testing.assert_close(rollout.rewards, torch.tensor([1.0, 0.0]))
    assert rollout.metrics["completion/truncated_frac"] == 0.5


def test_quickstart_length_limit_fits_every_worked_solution_of_its_mix() -> None:
    # max_new_tokens is set from the mix: every worked solution of every level the quickstart trains on, with
    # its EOS, must fit, or a correct answer would be cut off. Enumerates every problem of those levels (two
    # operands: 300, the longest 5 tokens; three: 3,000, 11 tokens; a level-4 problem such as 9*9*9*9= needs 20).
    config = yaml.safe_load(QUICKSTART.read_text())["data"]
    mixes = [config[split]["init_args"]["mix"] for split in ("train", "val")]
    assert mixes[0] == mixes[1]  # validation measures the distribution trained on
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    longest = 0
    for level in (level for level, weight in mixes[0].items() if weight > 0):
        for operands in itertools.product(range(10), repeat=level):
            for operators in itertools.product("+-*", repeat=level - 1):
                solution = ArithmeticProblem(operands, operators).solution
                longest = max(longest, len(tokenizer(solution, add_special_tokens=False)["input_ids"]) + 1)
    assert longest <= config["sampling"]["max_new_tokens"]


class _PaddingPolicy(torch.nn.Module):
    """The tiny policy with the padding habit forced on: the ``t``-th sampled token of every row is ``script[t]``
    (its logit raised by 1e4), whatever the temperature. The real model runs underneath for the KV cache."""

    def __init__(self, inner: torch.nn.Module, script: list[int]) -> None:
        super().__init__()
        self.inner, self.script, self.config, self.calls = inner, script, inner.config, 0

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[:, -1, self.script[self.calls]] += 1e4
        self.calls += 1
        return out

    def get_output_embeddings(self) -> torch.nn.Module:  # the engine sizes its token texts by the output head
        return self.inner.get_output_embeddings()


def test_quickstart_sampling_ends_a_completion_at_the_box() -> None:
    config = yaml.safe_load(QUICKSTART.read_text())["data"]
    sampling = SamplingConfig(**config["sampling"])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    junk = "\\boxed{6}0}" + "0" * (sampling.max_new_tokens - 5)
    script = tokenizer(junk, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("3+4-1=")["input_ids"]

    def sample(settings: SamplingConfig) -> Generation:
        policy = _PaddingPolicy(AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH), script)
        return HFEngine(policy, tokenizer).generate([prompt], 2, settings, seeds=[0])

    without_stop = sample(SamplingConfig(temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens))
    assert tokenizer.decode(without_stop.completion_ids[0]) == junk  # the policy pads when nothing stops it
    assert without_stop.truncated == [True, True]
    stopped = sample(sampling)  # the quickstart's settings (validation uses them at temperature 0)
    assert tokenizer.batch_decode(stopped.completion_ids) == ["\\boxed{6}", "\\boxed{6}"]
    assert stopped.truncated == [False, False]
    greedy = sample(SamplingConfig(**{**config["sampling"], "temperature": config["val_temperature"]}))
    assert tokenizer.batch_decode(greedy.completion_ids) == ["\\boxed{6}", "\\boxed{6}"]
