"""Question-answering rewards: SQuAD-style exact match and token F1 against one or more references.

Normalisation is the SQuAD v1.1 evaluation script's: lower-case, drop punctuation, drop the articles
"a", "an", "the", collapse whitespace. A prediction is scored against every reference and the best
score is kept. As in SQuAD v2, F1 with an empty side is 1 when both are empty, else 0.

The answer read from a completion (project's rule, in order): the content of its last complete
``\\boxed{}``; else the text after its last "Answer:" (case-insensitive) up to the end of that line;
else the whole completion. An empty last box is no answer (score 0), also against a reference that
normalises to nothing.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from lit_gcpo.rewards.answers import extract_boxed
from lit_gcpo.rewards.loading import REWARDS, reads_gold
from lit_gcpo.rewards.math_reward import completion_text

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_qa_answer(completion: str) -> str:
    """The answer stated by a completion (last box, else after the last "Answer:", else everything)."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_MARK.finditer(completion))
    if marks:
        return completion[marks[-1].end() :].strip().split("\n", 1)[0].strip()
    return completion.strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (tokens counted with multiplicity)."""
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def references(value: Any) -> list[str]:
    """Reference answers from a gold field: a string, a list of strings, or SQuAD's ``{"text": [...]}``."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _row_references(index: int, columns: dict[str, list[Any]]) -> list[str]:
    for field in ("gold", "answer", "answers"):
        values = columns.get(field)
        if values is not None:
            found = references(values[index])
            if found:
                return found
    return []


def _score(completions: list[Any], columns: dict[str, list[Any]], metric: Any) -> list[float | None]:
    scores: list[float | None] = []
    for index, completion in enumerate(completions):
        refs = _row_references(index, columns)
        if not refs:
            scores.append(None)
            continue
        predicted = extract_qa_answer(completion_text(completion))
        if not predicted.strip():  # an empty \boxed{} states no answer, even against a reference like "The"
            scores.append(0.0)
            continue
        scores.append(max(metric(predicted, ref) for ref in refs))
    return scores


@REWARDS.register("qa_exact_match")
@reads_gold
def qa_exact_match(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """1.0 when the completion's answer equals a reference after normalisation (``gold``/``answer``/``answers``)."""
    return _score(completions, columns, exact_match)


@REWARDS.register("qa_f1")
@reads_gold
def qa_f1(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """Best token F1 of the completion's answer over the references (``gold``/``answer``/``answers``)."""
    return _score(completions, columns, token_f1)
