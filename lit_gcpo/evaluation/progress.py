"""``EvaluationProgress``: the graded records of an evaluation, written batch by batch, so that an
interrupted ``lit-gcpo test`` restarted with the same config skips what is done.

One JSON line per evaluated batch::

    {"name": <test dataloader name>, "positions": [row positions of the batch], "settings": {...},
     "records": [one record per prompt]}

``settings`` is everything that decides the batch's content and completions (the pass's sampling and
sample count, the evaluation batch size, the number of ranks, the seed, the model label). Each line is
written with one ``write`` and flushed to disk (``fsync``) before the next batch, so a killed run leaves
complete lines and at most one torn last line, which ``load`` drops (and cuts from the file, so that the
next append starts on a fresh line). A resumed run must have the same settings for every pass it finds
in the file, and the same prompts at the positions of every batch found (a changed template, context
budget, ``limit`` or file): anything else raises (the records would not be the ones this config
produces).

One file per data-parallel rank (``<stem>_progress.rank<r>.jsonl``): each rank skips its own batches. A kill
can leave the ranks a batch or more apart; the resumed ranks then keep, for each test name, only as many
batches as every rank finished (``keep_first``), so that they run the same batches again: under ``fsdp2`` each
forward pass is a collective, and a rank with fewer batches left would leave the others waiting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_gcpo.evaluation.results import Record, jsonable
from lit_gcpo.running.checkpointing import atomic_write

log = logging.getLogger(__name__)


class EvaluationProgress:
    """The progress file of one rank of one evaluation.

    Args:
        path: the JSONL file (created on the first ``append``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.batches: list[dict[str, Any]] = []

    def load(self) -> None:
        """Read the batches already done; a torn last line (the run was killed mid-write) is dropped."""
        self.batches = []
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        good = 0  # bytes of complete, readable lines
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            self.batches.append(entry)
            good += len(line)
        if good < len(raw):
            log.warning(
                "%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path, len(raw) - good
            )
            with self.path.open("r+b") as handle:
                handle.truncate(good)
        if self.batches:
            log.info("%s: resuming, %d evaluated batches found", self.path, len(self.batches))

    def done(self) -> dict[str, set[tuple[int, ...]]]:
        """``{test name: {row positions of each batch done}}``."""
        result: dict[str, set[tuple[int, ...]]] = {}
        for entry in self.batches:
            result.setdefault(entry["name"], set()).add(tuple(entry["positions"]))
        return result

    def counts(self) -> dict[str, int]:
        """``{test name: batches done}``."""
        result: dict[str, int] = {}
        for entry in self.batches:
            result[entry["name"]] = result.get(entry["name"], 0) + 1
        return result

    def keep_first(self, counts: Mapping[str, int]) -> int:
        """Keep the first ``counts[name]`` batches of each test name (0 for a name not given), in the order they
        were written, which is the order this rank evaluates them; the file is rewritten at once (a new file
        renamed over it) when a batch is dropped. Returns the number dropped, to be evaluated again."""
        seen: dict[str, int] = {}
        kept = []
        for entry in self.batches:
            seen[entry["name"]] = seen.get(entry["name"], 0) + 1
            if seen[entry["name"]] <= counts.get(entry["name"], 0):
                kept.append(entry)
        dropped = len(self.batches) - len(kept)
        if dropped:
            lines = "".join(_line(entry) for entry in kept).encode()
            atomic_write(self.path, lambda handle: handle.write(lines))
            self.batches = kept
        return dropped

    def check(
        self, settings: Mapping[str, Mapping[str, Any]], prompts: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Raise unless every batch found was made with ``settings[its name]`` (JSON-comparable) and, for
        the names in ``prompts``, from the prompts now at its positions."""
        expected = {name: jsonable(dict(value)) for name, value in settings.items()}
        for entry in self.batches:
            name = entry["name"]
            if name not in expected:
                raise ValueError(
                    f"{self.path}: has results of {name!r}, which this config does not evaluate "
                    f"(it evaluates {sorted(expected)}); delete the file or choose another output_dir"
                )
            if entry["settings"] != expected[name]:
                differing = sorted(
                    k
                    for k in set(entry["settings"]) | set(expected[name])
                    if entry["settings"].get(k) != expected[name].get(k)
                )
                raise ValueError(
                    f"{self.path}: {name!r} was evaluated with other settings ({', '.join(differing)} differ: "
                    f"{ {k: entry['settings'].get(k) for k in differing} } then, "
                    f"{ {k: expected[name].get(k) for k in differing} } now); "
                    "delete the file or choose another output_dir"
                )
            current = (prompts or {}).get(name)
            if current is not None:
                now = [current[p] if 0 <= p < len(current) else None for p in entry["positions"]]
                if now != [record.get("prompt") for record in entry["records"]]:
                    raise ValueError(
                        f"{self.path}: the prompts of {name!r} at positions {entry['positions']} are not the ones "
                        "evaluated then (template, context budget, limit or file changed); delete the file or "
                        "choose another output_dir"
                    )

    def records(self) -> list[Record]:
        """The records of every batch done, in the order they were written."""
        return [record for entry in self.batches for record in entry["records"]]

    def append(self, name: str, positions: Sequence[int], settings: Mapping[str, Any], records: list[Record]) -> None:
        """Write one batch's records as one line, on disk before returning."""
        entry = {"name": name, "positions": list(positions), "settings": jsonable(dict(settings))}
        entry["records"] = jsonable(records)
        line = _line(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.batches.append(json.loads(line))


def _line(entry: dict[str, Any]) -> str:
    """One batch's entry as a line of the progress file (strict JSON: NaN was stored as null by ``jsonable``)."""
    return json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n"
