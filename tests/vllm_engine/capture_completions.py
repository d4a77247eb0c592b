"""A callback for the subprocess runs of test_vllm_eval.py: writes every test completion to a JSON file."""

from __future__ import annotations

import json
import os

import lightning as L


class CaptureCompletions(L.Callback):
    def __init__(self) -> None:
        self.items: dict[str, list[str]] = {}

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for prompt, completion in zip(batch.prompts, batch.completions, strict=True):  # one sample per prompt
            self.items.setdefault(prompt, []).append(completion)

    def on_test_end(self, trainer, pl_module) -> None:
        with open(os.environ["CAPTURE_COMPLETIONS"], "w") as handle:
            json.dump(self.items, handle)
