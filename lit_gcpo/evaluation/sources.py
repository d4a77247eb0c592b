"""``BenchmarkSource``: one evaluation benchmark as a prompt source of the rollout DataModule.

Rows are the loader's items (``lit_gcpo.evaluation.benchmarks``) with the question as ``prompt``:
``{"prompt", "context", "gold", "id", "kind", "benchmark", "index"}`` (``index`` = position in the
benchmark, which keeps the report in benchmark order after a multi-rank run). The source carries its
own prompt template and required fields, which the DataModule uses instead of its own, so math and QA
benchmarks can be evaluated in one ``lit-gcpo test`` run.

Items whose gold cannot be read are left out by the loader; their ids are in ``skipped`` (and in the
report of ``lit_gcpo.evaluation.callback.BenchmarkReport``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from lit_gcpo.data.sources import PromptSource
from lit_gcpo.data.templates import QWEN_MATH_TEMPLATE
from lit_gcpo.evaluation.benchmarks import BENCHMARKS, load_benchmark

log = logging.getLogger(__name__)

MATH_TEMPLATE = QWEN_MATH_TEMPLATE
"""The Qwen2.5-Math evaluation prompt: the problem, then "reason step by step ... \\boxed{}"."""

QA_TEMPLATE = (
    "{context}\n\nAnswer the question using the passage above. Question: {prompt}\n"
    "Give a short answer and put it within \\boxed{}."
)
"""Context, then the question, asking for a short answer in a box (read by ``extract_qa_answer``)."""


class BenchmarkSource(PromptSource):
    """The items of one registered benchmark, from a local file or the hub.

    Args:
        name: a registered benchmark (``math500``, ``aime24``, ``amc23``, ``minerva_math``,
            ``olympiadbench``, ``gsm8k``, ``hotpotqa``, ``narrativeqa``).
        path: a local JSONL/JSON/Parquet file in the benchmark's layout; None reads the hub dataset.
        limit: keep only the first ``limit`` rows (0 = all), before unreadable ones are left out.
        template: the user message with ``{prompt}`` (and ``{context}`` for QA) placeholders; None =
            ``MATH_TEMPLATE`` for math, ``QA_TEMPLATE`` for QA.
        max_context_tokens: cut each QA context to this many tokens of the policy's tokenizer (None:
            keep it whole). The cut falls on a token boundary of the original text.
    """

    required_fields: ClassVar[list[str]] = ["prompt", "gold"]

    def __init__(
        self,
        name: str,
        path: str | None = None,
        limit: int = 0,
        template: str | None = None,
        max_context_tokens: int | None = None,
    ) -> None:
        super().__init__(None, limit)
        spec = BENCHMARKS.get(name)
        if max_context_tokens is not None and max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1 (or None), got {max_context_tokens}")
        self.name, self.path, self.kind = name, path, spec.kind
        self.template = template if template is not None else (MATH_TEMPLATE if spec.kind == "math" else QA_TEMPLATE)
        self.max_context_tokens = max_context_tokens
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

    def describe(self) -> str:
        return self.name if self.path is None else f"{self.name}({self.path})"
