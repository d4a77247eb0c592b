"""The noisy-reward arithmetic testbed: where GCPO's premise can hold or fail, on the CPU in minutes.

GCPO's premise (METHODS.md §5): disagreement among a group's completions that the rewards do not explain is
noise, and damping the advantages of such prompts helps. On the plain arithmetic task every reward is exact,
so there is no noise to damp and every weighting can at best reallocate a clean update. This testbed adds the
thing the premise is about: a share of the training prompts whose rewards carry no information at all.

- Rows are those of ``lit_gcpo.tasks.arithmetic`` plus ``noise_rate``: 0 for a clean prompt, ``rate`` for a
  noisy one. A training prompt is noisy when its level is in ``noisy_levels``, with probability
  ``noisy_share`` (drawn from the seed). Validation rows are always clean, so validation accuracy measures
  what the policy learnt, not what the noise taught it.
- ``noisy_math_accuracy`` (the reward) scores a clean prompt like ``math_accuracy``; on a noisy prompt every
  completion gets an independent coin flip, 1 with probability ``noise_rate``, whatever it answers. The coin
  is a hash of (prompt, completion text, position in the scoring call), so a run is reproducible and two
  identical completions of a group still get independent coins.

Under GRPO a noisy group with mixed coins gets full-size advantages that push the policy towards arbitrary
completions. Whether an uncertainty weighting damps those groups is the question the testbed asks:

- ``noisy_levels = (3, 4)`` (default, "premise plausible"): the noise falls on the hard prompts, where the
  warm-started tiny policy's answers disagree most (it solves few of them), so a geometric signal of
  disagreement *can* single them out; whether U_c = U (1 - RD) does, once RD of a coin-flip group is high, is
  what the comparison measures.
- ``noisy_levels = (2,)`` ("premise false"): the noise falls on the easy prompts, where the policy mostly agrees
  with itself; damping disagreement then damps the clean, hard prompts instead of the noisy ones.
- Within one level, ``noisy_answers`` picks the prompts by their gold answer: ``long`` (two or more characters:
  a two-digit or a negative result) or ``short`` (a single digit). On the two-operand task of the quickstart
  (``mix: {2: 1.0}``) the shipped policy's sampled groups (temperature 0.7, G = 8) had on average 1.1 (two-digit
  results) and 1.6 (negative results) correct completions, against 2.7 for single-digit results, 19 % of whose
  groups were all correct: ``long`` is the premise-plausible arm of the comparison (noise on the hard prompts),
  ``short`` the premise-false arm (noise on the easy ones). ``benchmarks/match_noise_rate.py`` measures this.

The reward's ``noise_rate`` 0.25 gives a coin-flip group k ~ Bin(8, 1/4) successes (mostly 1-3 of 8, RD 0.66-
0.97), in the range of the clean hard prompts' spread groups. Measured on the shipped policy
(``benchmarks/uncertainty_faithfulness.py --testbed noisy``) the coin-flip groups still have a higher RD on
average, so ``1 - RD`` lifts them: gcpo gives them about 1.07-1.08 times the weight of the clean spread groups,
while SEED-GRPO's scale-free weighting gives them 0.90 times (benchmarks/RESULTS.md). On this noise the
premise fails by construction of the calibration.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lit_gcpo.rewards.loading import reads_gold
from lit_gcpo.rewards.math_reward import completion_text, math_accuracy
from lit_gcpo.tasks.arithmetic import ArithmeticTask

NOISE_FIELD = "noise_rate"
NoisyAnswers = Literal["all", "short", "long"]
# A separate stream of the seed, so that marking prompts noisy never changes which prompts are drawn.
_MARK_STREAM = 7_919


def mark_noisy(
    rows: Sequence[Mapping[str, Any]],
    noisy_levels: Sequence[int],
    noisy_share: float,
    noise_rate: float,
    seed: int,
    noisy_answers: NoisyAnswers = "all",
) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``noise_rate`` set: ``noise_rate`` for the rows drawn noisy, else 0.

    A row of a level in ``noisy_levels`` whose answer is of the ``noisy_answers`` kind (``answer_kind``) is noisy
    with probability ``noisy_share``; the draw uses its own ``random.Random`` stream of ``seed`` and one draw
    per row, in order, whether the row is eligible or not (so the kinds never change each other's draws).
    """
    if not 0.0 <= noisy_share <= 1.0:
        raise ValueError(f"noisy_share must be in [0, 1], got {noisy_share}")
    if not 0.0 < noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in (0, 1) (a coin that can land both ways), got {noise_rate}")
    if noisy_answers not in ("all", "short", "long"):
        raise ValueError(f"noisy_answers must be 'all', 'short' or 'long', got {noisy_answers!r}")
    rng = random.Random(seed * 1_000_003 + _MARK_STREAM)
    levels = {int(level) for level in noisy_levels}
    marked = []
    for row in rows:
        eligible = int(row["level"]) in levels and (
            noisy_answers == "all" or answer_kind(row["answer"]) == noisy_answers
        )
        noisy = rng.random() < noisy_share and eligible
        marked.append({**row, NOISE_FIELD: noise_rate if noisy else 0.0})
    return marked


def answer_kind(answer: str) -> Literal["short", "long"]:
    """``short`` for a one-character answer (a single digit), ``long`` for a longer one (two digits, a sign)."""
    return "short" if len(str(answer).strip()) == 1 else "long"


def noise_coin(prompt: str, completion: str, position: int, rate: float) -> float:
    """1.0 with probability ``rate``, from a stable hash of the arguments (not Python's salted ``hash``)."""
    key = f"{prompt}\x1f{completion}\x1f{position}".encode()
    return 1.0 if zlib.crc32(key) / 2**32 < rate else 0.0


@reads_gold
def noisy_math_accuracy(prompts: list[str], completions: list[Any], **columns: list[Any]) -> list[float | None]:
    """``math_accuracy`` on clean rows; an independent coin flip of probability ``noise_rate`` on noisy rows.

    Rows without a ``noise_rate`` column (or with 0) are clean. See the module docstring.
    """
    exact = math_accuracy(prompts, completions, **columns)
    rates = columns.get(NOISE_FIELD) or [0.0] * len(completions)
    scores: list[float | None] = []
    for position, (prompt, completion, rate, score) in enumerate(zip(prompts, completions, rates, exact, strict=True)):
        rate = float(rate or 0.0)
        scores.append(noise_coin(prompt, completion_text(completion), position, rate) if rate > 0 else score)
    return scores


class NoisyArithmeticTask(ArithmeticTask):
    """The arithmetic task with reward noise on a share of its training prompts (module docstring).

    The problems are those of ``ArithmeticTask`` with the same ``split``, sizes, ``mix`` and ``seed`` (see it for
    those arguments); the validation split is always clean.

    Args:
        noisy_levels: the levels whose prompts may be noisy (default ``[3, 4]``).
        noisy_share: probability that a prompt of those levels is noisy.
        noise_rate: probability of reward 1 for a completion of a noisy prompt.
        noisy_answers: only prompts whose gold answer is ``short`` (one digit) or ``long`` (two digits or a
            sign) may be noisy; ``all`` (default) does not look at the answer.
    """

    def __init__(
        self,
        split: Literal["train", "validation"] = "train",
        num_train: int = 5000,
        num_val: int = 256,
        mix: dict[int, float] | None = None,
        seed: int = 0,
        noisy_levels: list[int] | None = None,
        noisy_share: float = 1.0,
        noise_rate: float = 0.25,
        noisy_answers: NoisyAnswers = "all",
        limit: int = 0,
    ) -> None:
        super().__init__(split=split, num_train=num_train, num_val=num_val, mix=mix, seed=seed, limit=limit)
        self.noisy_levels = list(noisy_levels) if noisy_levels is not None else [3, 4]
        self.noisy_share, self.noise_rate, self.noisy_answers = noisy_share, noise_rate, noisy_answers
        mark_noisy([], self.noisy_levels, noisy_share, noise_rate, seed, noisy_answers)  # validates the options now

    def _read(self) -> list[dict[str, Any]]:
        rows = super()._read()
        if self.split == "validation":
            return [{**row, NOISE_FIELD: 0.0} for row in rows]
        return mark_noisy(rows, self.noisy_levels, self.noisy_share, self.noise_rate, self.seed, self.noisy_answers)

    def describe(self) -> str:
        answers = "" if self.noisy_answers == "all" else f", answers={self.noisy_answers}"
        return f"noisy_arithmetic[{self.split}](seed={self.seed}, levels={self.noisy_levels}{answers})"
