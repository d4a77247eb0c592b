"""An embedded free-text QA task with near-synonym answers: GCPO's QA setting at the size of a CPU test.

The GCPO paper's QA setting (HotpotQA distractor, ``configs/gcpo_qa.yaml``) trains on free-text answers graded
by token F1 and clusters them with a sentence-transformer, where semantic entropy counts near-synonyms
("red", "crimson") as different answers although they mean the same: the anisotropic gap that geometric
signals (BoT, CD over sentence embeddings) are meant to close. Nothing of it runs on a CPU in a test, so this
module generates the same shape of problem from a seed, with no download:

- a passage of ``num_facts`` facts "ann has a red cup." and a question "what color is bob's hat?";
- the gold answer is the colour, and its references (the ``answer`` column, a list read by ``qa_f1``) include
  two near-synonyms, so "red", "crimson" and "scarlet" all score 1 while "blue" scores 0;
- ``build_qa_policy`` makes a tiny character-level Llama over ``QA_VOCAB`` and warm-starts it on worked
  answers that use a random one of the synonyms, so its samples disagree both in meaning (another fact's
  colour) and in wording only (a synonym): the two kinds of disagreement the signals are meant to tell apart.

Rows: ``{"prompt", "answer": [colour, *synonyms], "colour"}``; the prompt is the exact text the model sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lit_gcpo.assets.tiny_model import SPECIAL_TOKENS
from lit_gcpo.data.sources import PromptSource

COLOURS: dict[str, tuple[str, str]] = {
    "red": ("crimson", "scarlet"),
    "blue": ("navy", "azure"),
    "green": ("olive", "lime"),
    "white": ("ivory", "snow"),
    "black": ("ebony", "coal"),
}
"""Each colour with its two near-synonyms (accepted as correct)."""
NAMES = ("ann", "bob", "cal", "dan", "eve", "fay", "gus", "ivy")
OBJECTS = ("cup", "hat", "box", "pen", "bag", "kite")
QA_VOCAB: tuple[str, ...] = (*SPECIAL_TOKENS, *"abcdefghijklmnopqrstuvwxyz .?'")
"""The tiny QA policy's tokens: the special tokens, then one per character the task uses."""


@dataclass(frozen=True)
class QAProblem:
    """A passage of facts ``(name, colour, object)`` and the index of the fact asked about."""

    facts: tuple[tuple[str, str, str], ...]
    asked: int

    @property
    def prompt(self) -> str:
        passage = " ".join(f"{name} has a {colour} {thing}." for name, colour, thing in self.facts)
        name, _, thing = self.facts[self.asked]
        return f"{passage} what color is {name}'s {thing}? "

    @property
    def colour(self) -> str:
        return self.facts[self.asked][1]

    @property
    def references(self) -> list[str]:
        return [self.colour, *COLOURS[self.colour]]

    def solution_with(self, rng: random.Random) -> str:
        """A worked answer: the colour or one of its synonyms, drawn from ``rng``."""
        return rng.choice(self.references)

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.references, "colour": self.colour}


def qa_problems(num_rows: int, seed: int, num_facts: int = 2) -> list[QAProblem]:
    """``num_rows`` problems from a private ``random.Random(seed)``: distinct names and colours per passage."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if not 1 <= num_facts <= len(COLOURS):
        raise ValueError(f"num_facts must be in 1..{len(COLOURS)}, got {num_facts}")
    rng = random.Random(seed)
    problems = []
    for _ in range(num_rows):
        names = rng.sample(NAMES, num_facts)
        colours = rng.sample(sorted(COLOURS), num_facts)
        things = [rng.choice(OBJECTS) for _ in range(num_facts)]
        facts = tuple(zip(names, colours, things, strict=True))
        problems.append(QAProblem(facts, rng.randrange(num_facts)))
    return problems


class EmbeddedQATask(PromptSource):
    """The embedded QA task (module docstring); train and validation rows are streams ``2 seed`` and
    ``2 seed + 1`` of the generator, so changing ``num_train`` never changes the validation rows.

    Args:
        split: ``train`` or ``validation``.
        num_train: problems in the training split.
        num_val: problems in the validation split.
        num_facts: facts per passage (the question asks about one of them).
        seed: the generator's seed.
        fields: renames columns, ``{source_name: name_used_here}``.
        limit: keep only the first ``limit`` rows (0 = all).
    """

    def __init__(
        self,
        split: Literal["train", "validation"] = "train",
        num_train: int = 2000,
        num_val: int = 128,
        num_facts: int = 2,
        seed: int = 0,
        fields: dict[str, str] | None = None,
        limit: int = 0,
    ) -> None:
        super().__init__(fields, limit)
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
        qa_problems(0, seed, num_facts)  # validates num_facts now
        self.split, self.num_train, self.num_val, self.num_facts, self.seed = split, num_train, num_val, num_facts, seed

    def _read(self) -> list[dict[str, Any]]:
        if self.split == "validation":
            return [p.to_row() for p in qa_problems(self.num_val, 2 * self.seed + 1, self.num_facts)]
        return [p.to_row() for p in qa_problems(self.num_train, 2 * self.seed, self.num_facts)]

    def describe(self) -> str:
        return f"embedded_qa[{self.split}](seed={self.seed})"


def build_qa_policy(
    target: str | Path,
    sft_steps: int = 60,
    batch_size: int = 32,
    hidden_size: int = 48,
    seed: int = 0,
    lr: float = 3e-3,
) -> float:
    """Build the tiny QA policy, warm-start it on worked answers (random synonym) and save it with its tokenizer
    to ``target``; returns the last SFT loss. Deliberately short: RL needs a policy that is right only sometimes.
    """
    import torch

    from lit_gcpo.assets.tiny_model import build_char_tokenizer, build_tiny_config, build_tiny_model, sft_loss

    tokenizer = build_char_tokenizer(QA_VOCAB)
    config = build_tiny_config(
        hidden_size=hidden_size, num_layers=2, num_heads=2, intermediate_size=2 * hidden_size, vocab_tokens=QA_VOCAB
    )
    model = build_tiny_model(config, seed=seed).train()
    problems = qa_problems(sft_steps * batch_size, seed=10_000 + seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(sft_steps):
        chunk = problems[step * batch_size : (step + 1) * batch_size]
        loss = sft_loss(model, tokenizer, [p.prompt for p in chunk], [p.solution_with(rng) for p in chunk])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    Path(target).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return float(loss.detach())
