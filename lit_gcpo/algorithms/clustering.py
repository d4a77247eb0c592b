"""Semantic clusters of every group of a step (METHODS.md §3).

Two clusterers, both returning ``cluster_ids [N]`` local to each group (0, 1, ... in order of first
appearance within the group), the form ``lit_gcpo.algorithms.uncertainty`` accepts:

- ``embedding_clusters``: unit-normalised embeddings; completions i, j of the same group are linked when
  ``cos(e_i, e_j) >= tau``; clusters are the connected components of the links. One FAISS range search
  covers the whole batch. The index is an ``IndexIVFFlat`` whose inverted lists are the groups
  (vectors added with their group as the precomputed list, queries searched with ``nprobe = 1`` in their
  own group's list via ``range_search_preassigned``): only within-group pairs are ever scored, O(N G d),
  whereas an ``IndexFlatIP`` over the whole batch scores all O(N^2 d) pairs and then discards the
  cross-group links (512x wasted work at 512 groups; see ``benchmarks/bench_clustering.py``).
  Boundary: FAISS keeps inner products strictly ``> radius``; to honour ``>= tau`` exactly the search
  uses ``radius = tau - 1e-4`` (well above float32 rounding of unit-vector dot products) and every
  candidate pair is re-scored in float64 and kept when ``>= tau``.
  GPU: this file uses ``faiss-cpu``. ``faiss-gpu`` wheels need CUDA 12 and GPU indexes do not implement
  range search; on a GPU the swap is a k-NN search with ``k = G`` in a ``GpuIndexIVFFlat`` built the same
  way (or a batched ``[B, G, d] @ [B, d, G]`` matmul in torch), followed by the same ``>= tau`` filter
  and connected components. Range search on a few thousand 384-d vectors is milliseconds on CPU, so
  the CPU index is kept even when training on GPU.
- ``answer_clusters``: final answers compared with an injectable equivalence (default
  ``lit_gcpo.rewards.answers.compare_answers``, math-verify). Within each group, each answer joins the first
  cluster whose representative (its first member) is equivalent, else opens a new cluster; a ``None``
  answer is its own singleton (SEED-GRPO's rule). Equivalence is taken as symmetric; checks are cached
  per call on the stripped string pair and identical strings short-circuit. Greedy assignment against
  representatives is the project's reading: math-verify equivalence need not be transitive, and this
  rule makes the result independent of everything but the order of completions. A comparison that gets no
  verdict (math-verify timed out, raised, or its process crashed: the equivalence returns a ``Verdict`` with a
  ``problem``) counts as not equivalent, as in the rewards, and is reported with its completions
  (``NoVerdict``; by default one warning per call; ``MissingVerdicts`` keeps them to count them and warn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

Equivalence = Callable[[str, str], Any]
"""``(a, b) ->`` a bool, or a ``lit_gcpo.rewards.answers.Verdict`` (``equal``, and ``problem``: why there is none)."""

NoVerdict = Callable[[int, int, str], None]
"""``(position, other position, why)``: the comparison of two completions' answers got no verdict."""

SEARCH_MARGIN = 1e-4

COMPARED = ("comparisons", "taken as not equivalent")
"""How ``report_missing_verdicts`` words the comparisons of a clustering or a vote."""


def verdict_of(result: Any) -> tuple[bool, str | None]:
    """An equivalence's answer as ``(equal, why there is no verdict or None)``: a bool has a verdict always."""
    return bool(getattr(result, "equal", result)), getattr(result, "problem", None)


class MissingVerdicts:
    """A ``NoVerdict`` sink that keeps each comparison without a verdict, to count them (``len``) and name them in
    one warning (``warn``). ``group_ids``: ``[N]`` group of each completion, to name it with its position."""

    def __init__(self, group_ids: Sequence[int]) -> None:
        self.groups = list(group_ids)
        self.lines: list[str] = []

    def __call__(self, position: int, other: int, why: str) -> None:
        self.lines.append(f"completion {position} (group {self.groups[position]}) against {other}: {why}")

    def __len__(self) -> int:
        return len(self.lines)

    def warn(self, what: str = "answer clustering") -> None:
        """One warning naming every comparison kept (none: nothing is said)."""
        if not self.lines:
            return
        from lit_gcpo.rewards.answers import report_missing_verdicts

        report_missing_verdicts(what, self.lines, len(self.groups), outcome=COMPARED)


def _unit_float64(embeddings: Tensor) -> np.ndarray:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {tuple(embeddings.shape)}")
    unit = torch.nn.functional.normalize(embeddings.detach().cpu().double(), dim=-1)  # [N, d]
    return unit.numpy()


def pair_cosines(unit: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 cosine of the listed pairs of unit vectors (the exact score the ``>= tau`` rule uses)."""
    return np.einsum("pd,pd->p", unit[rows], unit[cols])


def _local_ids(labels: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """Relabel global component labels ``0..C-1`` to 0, 1, ... within each group, in order of first
    appearance (components never span groups)."""
    _, first = np.unique(labels, return_index=True)  # [C] first position of each component
    component_group = group_ids[first]  # [C]
    order = np.lexsort((first, component_group))  # components sorted by group, then first position
    sorted_groups = component_group[order]
    group_start = np.searchsorted(sorted_groups, sorted_groups, side="left")  # [C]
    rank = np.empty(len(first), dtype=np.int64)
    rank[order] = np.arange(len(first)) - group_start
    return rank[labels]


def embedding_clusters(embeddings: Tensor, group_ids: Tensor, tau: float) -> Tensor:
    """Connected components of the ``cos >= tau`` graph inside every group, ``[N]`` local ids (long).

    Args:
        embeddings: ``[N, d]`` one vector per completion (any scale; normalised here).
        group_ids: ``[N]`` group of each completion, values in ``[0, B)``.
        tau: cosine threshold in [-1, 1].
    """
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a cosine in [-1, 1], got {tau}")
    num = embeddings.shape[0]
    if group_ids.shape != (num,):
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must be [N] with N = {num} embeddings")
    if num == 0:
        return torch.zeros(0, dtype=torch.long, device=group_ids.device)
    # imported here: only embedding clustering needs them (faiss alone is 13 MiB of a run's memory otherwise)
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groups = group_ids.detach().cpu().numpy().astype(np.int64)  # [N]
    num_lists = int(groups.max()) + 1
    dim = embeddings.shape[1]
    vectors = torch.nn.functional.normalize(embeddings.detach().cpu().float(), dim=-1).numpy()  # [N, d]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, num_lists, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # lists are assigned by hand below; the coarse quantizer is never used
    index.nprobe = 1
    ids = np.arange(num, dtype=np.int64)
    index.add_core(num, faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(groups))
    lims, sims, neighbours = index.range_search_preassigned(vectors, tau - SEARCH_MARGIN, groups[:, None], None)
    rows = np.repeat(ids, np.diff(lims).astype(np.int64))  # [P] query of each candidate pair
    cols = neighbours.astype(np.int64)  # [P]
    keep = (groups[rows] == groups[cols]) & (sims >= tau + SEARCH_MARGIN)  # surely linked
    ambiguous = np.flatnonzero((groups[rows] == groups[cols]) & ~keep)  # within float32 error of tau
    if ambiguous.size:
        involved, compact = np.unique(np.concatenate([rows[ambiguous], cols[ambiguous]]), return_inverse=True)
        unit = _unit_float64(embeddings[torch.from_numpy(involved)])  # [M, d] float64
        pairs = compact.reshape(2, -1)
        keep[ambiguous] = pair_cosines(unit, pairs[0], pairs[1]) >= tau
    graph = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (rows[keep], cols[keep])), shape=(num, num))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return torch.from_numpy(_local_ids(labels, groups)).to(group_ids.device)


def embedding_clusters_reference(embeddings: Tensor, group_ids: Tensor, tau: float) -> Tensor:
    """Per-group brute force of ``embedding_clusters`` (all pairs, depth-first components); for tests
    and the benchmark."""
    unit = _unit_float64(embeddings)
    groups = group_ids.detach().cpu().numpy().astype(np.int64)
    local = np.zeros(len(groups), dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        size = len(members)
        rows, cols = np.meshgrid(members, members, indexing="ij")
        linked = (pair_cosines(unit, rows.ravel(), cols.ravel()) >= tau).reshape(size, size)
        linked = linked | linked.T
        label = np.full(size, -1)
        next_label = 0
        for start in range(size):
            if label[start] >= 0:
                continue
            stack = [start]
            label[start] = next_label
            while stack:
                node = stack.pop()
                for other in np.flatnonzero(linked[node] & (label < 0)):
                    label[other] = next_label
                    stack.append(other)
            next_label += 1
        local[members] = label
    return torch.from_numpy(local).to(group_ids.device)


def _default_equivalence() -> Equivalence:
    from lit_gcpo.rewards.answers import compare_answers

    return compare_answers


def answer_clusters(
    answers: Sequence[str | None],
    group_ids: Tensor,
    equivalent: Equivalence | None = None,
    on_no_verdict: NoVerdict | None = None,
) -> Tensor:
    """Cluster the final answers of every group by mathematical equivalence, ``[N]`` local ids (long).

    Args:
        answers: ``[N]`` extracted final answers; ``None`` = no answer (a singleton cluster).
        group_ids: ``[N]`` group of each completion.
        equivalent: ``(a, b) -> bool`` or ``Verdict``; default ``lit_gcpo.rewards.answers.compare_answers``
            (math-verify, time-bounded, never evaluates model text).
        on_no_verdict: called for each comparison without a verdict (once per answer pair and call) with the
            positions of the completion being placed and of the cluster's representative; None: one warning
            naming them.
    """
    if len(answers) != group_ids.numel():
        raise ValueError(f"answers has {len(answers)} entries but group_ids has {group_ids.numel()}")
    equivalent = equivalent if equivalent is not None else _default_equivalence()
    cache: dict[tuple[str, str], bool] = {}
    groups = group_ids.detach().cpu().tolist()
    warned = MissingVerdicts(groups)  # the default: one warning
    report = on_no_verdict if on_no_verdict is not None else warned

    def same(a: str, b: str, position: int, other: int) -> bool:
        if a == b:
            return True
        key = (a, b) if a <= b else (b, a)
        if key not in cache:
            cache[key], problem = verdict_of(equivalent(*key))
            if problem is not None:
                report(position, other, problem)
        return cache[key]

    local = [0] * len(answers)
    representatives: dict[int, list[tuple[str | None, int]]] = {}  # per group: (text, position) of each cluster
    for position, (answer, group) in enumerate(zip(answers, groups, strict=True)):
        reps = representatives.setdefault(group, [])
        text = answer.strip() if answer is not None else None
        match = None
        if text:  # None and empty answers are singletons
            match = next(
                (k for k, (rep, first) in enumerate(reps) if rep is not None and same(text, rep, position, first)), None
            )
        if match is None:
            match = len(reps)
            reps.append((text if text else None, position))
        local[position] = match
    if on_no_verdict is None:
        warned.warn()
    return torch.tensor(local, dtype=torch.long, device=group_ids.device)
