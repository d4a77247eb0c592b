"""The prompt batches the rollout DataModule's dataloaders yield: an endless shuffled stream for training, and
the evaluation rows once, in batches every rank runs the same number of.

Both are sharded by data-parallel rank (``rank`` and ``world_size`` are set by the DataModule) and yield
``PromptBatch``es; generation happens later, at step time (``lit_gcpo.data.datamodule``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from lit_gcpo.data.batch import PromptBatch


class PromptStream(IterableDataset):
    """An endless stream of prompt batches: epoch ``e`` visits the rows in the order of a permutation
    seeded by ``(seed, e)``; batch ``b`` of rank ``r`` takes positions ``[(b W + r) B, (b W + r + 1) B)``."""

    def __init__(self, rows: list[dict[str, Any]], prompts: list[str], batch_size: int, seed: int, start: Any) -> None:
        self.rows, self.prompts, self.batch_size, self.seed = rows, prompts, batch_size, seed
        self.start = start  # callable giving the first batch index when iteration begins (resume)
        self.rank, self.world_size = 0, 1
        self._orders: dict[int, list[int]] = {}  # the row orders of the epochs last computed (at most four)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # the dataloader's iterator and dynamic sampling may read different epochs
                self._orders.pop(next(iter(self._orders)))
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self.rows), generator=generator).tolist()
        return self._orders[epoch]

    def batch(self, index: int) -> PromptBatch:
        """This rank's batch ``index`` of the stream (what iteration yields after ``index`` batches). Dynamic
        sampling reads the rounds of a step through it (``lit_gcpo.data.dynamic_sampling``)."""
        n = len(self.rows)
        first = (index * self.world_size + self.rank) * self.batch_size
        positions = list(range(first, first + self.batch_size))
        indices = [self._order(position // n)[position % n] for position in positions]
        return PromptBatch(
            prompts=[self.prompts[i] for i in indices],
            rows=[self.rows[i] for i in indices],
            indices=indices,
            positions=positions,
        )

    def __iter__(self) -> Iterator[PromptBatch]:
        batch_index = self.start()
        while True:
            yield self.batch(batch_index)
            batch_index += 1


class EvalPrompts(IterableDataset):
    """The evaluation rows once, in order, sharded by rank, in batches (``skip``: batches, by their row
    indices, to leave out: already evaluated by an interrupted run)."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        prompts: list[str],
        batch_size: int,
        skip: Iterable[tuple[int, ...]] | None = None,
    ) -> None:
        self.rows, self.prompts, self.batch_size = rows, prompts, batch_size
        self.skip: set[tuple[int, ...]] = set(skip or ())
        self.rank, self.world_size = 0, 1
        self.lockstep = False  # the ranks' forward passes are collectives (fsdp2): an uneven split is an error

    def batches(self) -> list[list[int]]:
        """This rank's batches of row indices: rows ``rank, rank + W, ...``, in as many batches as the rank with
        the most rows needs, so that every rank runs the same number (under ``fsdp2`` each forward pass is a
        collective, and a rank a batch short would leave the others waiting). The batches hold ``batch_size``
        rows, except the last (and, on a rank with fewer rows, the last two). Where no such split exists (fewer
        rows than ranks, or batches of one row and an uneven count) a rank runs a batch fewer, unless
        ``lockstep`` (``fsdp2``), where that is an error."""
        mine = list(range(self.rank, len(self.rows), self.world_size))
        most = -(-len(self.rows) // self.world_size)
        count = -(-most // self.batch_size)
        if len(mine) < count:
            if not self.lockstep:  # DDP: a rank may run a batch fewer
                return [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
            raise ValueError(
                f"{len(self.rows)} evaluation rows cannot give each of {self.world_size} ranks the same number of "
                f"batches of at most {self.batch_size} rows (rank {self.rank} has {len(mine)} rows for {count} "
                "batches): use at least as many rows as ranks, and a batch size (val_batch_size) of 2 or more"
            )
        sizes, left = [], len(mine)
        for remaining in range(count - 1, -1, -1):  # leave at least one row for each batch still to come
            sizes.append(min(self.batch_size, left - remaining))
            left -= sizes[-1]
        starts = itertools.accumulate(sizes, initial=0)
        return [mine[start : start + size] for start, size in zip(starts, sizes, strict=False)]

    def __iter__(self) -> Iterator[PromptBatch]:
        for indices in self.batches():
            if tuple(indices) in self.skip:
                continue
            yield PromptBatch(
                prompts=[self.prompts[i] for i in indices],
                rows=[self.rows[i] for i in indices],
                indices=indices,
                positions=indices,
            )
