"""``BenchmarkSource``: one evaluation benchmark as a prompt source of the rollout DataModule.

Rows are the loader's items (``lit_gcpo.data.benchmarks``) with the question as ``prompt``:
``{"prompt", "context", "gold", "id", "kind", "benchmark", "index"}`` (``index`` = position in the
benchmark, which keeps the report in benchmark order after a multi-rank run). The source carries its
own prompt template and required fields, which the DataModule uses instead of its own, so math and QA
benchmarks can be evaluated in one ``lit-gcpo test`` run.

Items whose gold cannot be read are left out by the loader; their ids are in ``skipped`` (and in the
report of ``lit_gcpo.evaluation.callback.BenchmarkReport``).

Per-benchmark settings: ``samples`` (k), ``temperature`` and ``max_new_tokens`` override the DataModule's
evaluation settings for this benchmark alone (AIME wants more samples than GSM8K, QA short answers), and
``greedy: true`` adds a greedy pass (one completion at temperature 0) next to the sampled one: the
DataModule runs each pass (``eval_variants``) as its own dataloader, and the report shows them side by
side as ``<benchmark>/greedy`` and ``<benchmark>/sampled``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

from lit_gcpo.data.benchmarks import BENCHMARKS, load_benchmark
from lit_gcpo.data.sources import PromptSource
from lit_gcpo.data.templates import QWEN_MATH_TEMPLATE
from lit_gcpo.engines.base import SamplingConfig

log = logging.getLogger(__name__)

MATH_TEMPLATE = QWEN_MATH_TEMPLATE
"""The Qwen2.5-Math evaluation prompt: the problem, then "reason step by step ... \\boxed{}"."""

QA_TEMPLATE = (
    "{context}\n\nAnswer the question using the passage above. Question: {prompt}\n"
    "Give a short answer and put it within \\boxed{}."
)
"""Context, then the question, asking for a short answer in a box (read by ``extract_qa_answer``)."""

QASPER_TEMPLATE = (
    "{context}\n\nAnswer the question about the paper above. Question: {prompt}\n"
    'Give a short answer: a phrase from the paper, "yes" or "no", or "unanswerable" when the paper does '
    "not say. Put it within \\boxed{}."
)
"""The paper, then the question, with Qasper's answer kinds spelled out (project's wording)."""

_TEMPLATES = {"qasper": QASPER_TEMPLATE}


class EvalVariant(NamedTuple):
    """One evaluation pass over a benchmark: its name ("" for the only pass), sampling and samples."""

    name: str
    sampling: SamplingConfig
    samples: int


class BenchmarkSource(PromptSource):
    """The items of one registered benchmark, from a local file or the hub.

    Args:
        name: a registered benchmark (``math500``, ``aime24``, ``amc23``, ``minerva_math``,
            ``olympiadbench``, ``gsm8k``, ``hotpotqa``, ``narrativeqa``, ``qasper``).
        path: a local JSONL/JSON/Parquet file in the benchmark's layout; None reads the hub dataset.
        limit: keep only the first ``limit`` rows (0 = all), before unreadable ones are left out.
        template: the user message with ``{prompt}`` (and ``{context}`` for QA) placeholders; None =
            ``MATH_TEMPLATE`` for math, ``QASPER_TEMPLATE`` for Qasper, ``QA_TEMPLATE`` for other QA.
        max_context_tokens: cut each QA context to this many tokens of the policy's tokenizer (None:
            keep it whole). The cut falls on a token boundary of the original text.
        samples: completions per prompt for this benchmark (k); None = the DataModule's ``val_samples``.
        temperature: sampling temperature for this benchmark; None = the DataModule's ``val_temperature``.
        max_new_tokens: completion length limit for this benchmark; None = ``data.sampling.max_new_tokens``.
        greedy: also evaluate one greedy completion per prompt (temperature 0), reported as
            ``<name>/greedy`` next to the sampled pass ``<name>/sampled``.
    """

    required_fields: ClassVar[list[str]] = ["prompt", "gold"]

    def __init__(
        self,
        name: str,
        path: str | None = None,
        limit: int = 0,
        template: str | None = None,
        max_context_tokens: int | None = None,
        samples: int | None = None,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        greedy: bool = False,
    ) -> None:
        super().__init__(None, limit)
        spec = BENCHMARKS.get(name)
        for option, value, low in (("max_context_tokens", max_context_tokens, 1), ("samples", samples, 1)):
            if value is not None and value < low:
                raise ValueError(f"BenchmarkSource({name!r}): {option} must be >= {low} (or None), got {value}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"BenchmarkSource({name!r}): max_new_tokens must be >= 1 (or None), got {max_new_tokens}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"BenchmarkSource({name!r}): temperature must be >= 0 (or None), got {temperature}")
        self.name, self.path, self.kind = name, path, spec.kind
        default_template = _TEMPLATES.get(name, MATH_TEMPLATE if spec.kind == "math" else QA_TEMPLATE)
        self.template = template if template is not None else default_template
        self.max_context_tokens = max_context_tokens
        self.samples, self.temperature, self.max_new_tokens, self.greedy = samples, temperature, max_new_tokens, greedy
        self.skipped: list[str] = []
        self._tokenizer: Any = None

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """The policy's tokenizer, which measures ``max_context_tokens``."""
        self._tokenizer = tokenizer

    def _read(self) -> list[dict[str, Any]]:
        loaded = load_benchmark(self.name, self.path, limit=self.limit)
        self.skipped = list(loaded.skipped)
        rows = []
        for index, item in enumerate(loaded.items):
            rows.append(
                {
                    "prompt": item["question"],
                    "context": self._truncate(item["context"]),
                    "gold": item["gold"],
                    "id": item["id"],
                    "kind": item["kind"],
                    "benchmark": item["benchmark"],
                    "index": index,
                }
            )
        return rows

    def _truncate(self, context: str | None) -> str | None:
        if context is None or self.max_context_tokens is None:
            return context
        if self._tokenizer is None:
            raise RuntimeError(
                f"BenchmarkSource({self.name!r}): max_context_tokens needs a tokenizer; call bind_tokenizer() "
                "first (the rollout DataModule does)"
            )
        if not getattr(self._tokenizer, "is_fast", False):  # no offsets: cut the decoded tokens
            ids = self._tokenizer(context, add_special_tokens=False)["input_ids"]
            if len(ids) <= self.max_context_tokens:
                return context
            return self._tokenizer.decode(ids[: self.max_context_tokens])
        offsets = self._tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= self.max_context_tokens:
            return context
        return context[: offsets[self.max_context_tokens - 1][1]]

    def eval_variants(self, sampling: SamplingConfig, samples: int) -> list[EvalVariant]:
        """The passes over this benchmark, given the DataModule's evaluation ``sampling`` and ``samples``.

        One pass with this source's settings over the DataModule's; with ``greedy``, a greedy pass
        (``greedy``) before the sampled one (``sampled``).
        """
        tokens = self.max_new_tokens if self.max_new_tokens is not None else sampling.max_new_tokens
        temperature = self.temperature if self.temperature is not None else sampling.temperature
        # data.sampling.min_tokens holds up to this benchmark's own limit
        mine = replace(
            sampling, temperature=temperature, max_new_tokens=tokens, min_tokens=min(sampling.min_tokens, tokens)
        )
        count = self.samples if self.samples is not None else samples
        if not self.greedy:
            return [EvalVariant("", mine, count)]
        if temperature == 0:
            raise ValueError(
                f"BenchmarkSource({self.name!r}): greedy: true adds a greedy pass next to the sampled one, "
                "but the sampled pass has temperature 0 too; set temperature (or data.val_temperature) > 0"
            )
        return [EvalVariant("greedy", replace(mine, temperature=0.0), 1), EvalVariant("sampled", mine, count)]

    def describe(self) -> str:
        return self.name if self.path is None else f"{self.name}({self.path})"
