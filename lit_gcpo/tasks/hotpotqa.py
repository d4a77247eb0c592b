"""HotpotQA (distractor) as a training prompt source, for the GCPO paper's QA setting (``configs/gcpo_qa.yaml``).

The evaluation side already reads HotpotQA (``lit_gcpo.data.benchmarks``: titled paragraphs as the context,
the answer as the single reference); this source gives the same rows for any split, so that training and
validation prompts look alike. Rows: ``{"prompt", "context", "gold", "id"}``; ``qa_f1`` reads ``gold``.
"""

from __future__ import annotations

from typing import Any

from lit_gcpo.data.benchmarks import BENCHMARKS, normalise_rows
from lit_gcpo.data.sources import HubDataset, LocalFiles, PromptSource

HUB_PATH = "hotpotqa/hotpot_qa"


class HotpotQA(PromptSource):
    """HotpotQA distractor rows from the hub (or a local file in the hub's layout).

    Args:
        split: ``train`` or ``validation`` (the hub's splits of the ``distractor`` configuration).
        path: a local JSONL/JSON/Parquet file in the hub's layout instead of the hub.
        limit: keep only the first ``limit`` rows (0 = all), before unreadable ones are left out.
    """

    def __init__(self, split: str = "train", path: str | None = None, limit: int = 0) -> None:
        super().__init__(None, 0)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.split, self.path, self.row_limit = split, path, limit
        self.skipped: list[str] = []

    def _read(self) -> list[dict[str, Any]]:
        if self.path is not None:
            source: PromptSource = LocalFiles(self.path, limit=self.row_limit)
        else:
            source = HubDataset(HUB_PATH, split=self.split, name="distractor", limit=self.row_limit)
        loaded = normalise_rows(BENCHMARKS.get("hotpotqa"), source.load())
        self.skipped = list(loaded.skipped)
        return [
            {"prompt": item["question"], "context": item["context"], "gold": item["gold"], "id": item["id"]}
            for item in loaded.items
        ]

    def describe(self) -> str:
        return f"hotpotqa[{self.split}]" if self.path is None else f"hotpotqa({self.path})"
