"""Speed of semantic clustering and of the uncertainty signals against per-group loops.

Sections (each replaces its own block of ``benchmarks/RESULTS.md``):
- ``bench_clustering.embedding``: 8192 completions (512 groups of 16, 384-d) clustered in one FAISS
  range search (``embedding_clusters``) vs a per-group loop of ``IndexFlatIP`` range searches, and vs one
  ``IndexFlatIP`` range search over the whole batch that discards cross-group links; identical clusters
  are asserted.
- ``bench_clustering.answers``: answer clustering of 512 groups of 16 realistic math answers.
- ``bench_clustering.signals``: every uncertainty signal for 64 groups of 16 with 384-d embeddings,
  vectorised vs a plain per-group loop (values asserted equal).

    python benchmarks/bench_clustering.py                # every section
    python benchmarks/bench_clustering.py embedding      # one section
"""

from __future__ import annotations

import datetime as dt
import os
import random
import sys
import time

import faiss
import numpy as np
import torch
from _common import MACHINE, write_results_section
from bench_algos import time_it
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lit_gcpo.algorithms.clustering import answer_clusters, embedding_clusters, embedding_clusters_reference
from lit_gcpo.algorithms.uncertainty import uncertainty_signals
from lit_gcpo.rewards.answers import answers_equivalent


def _header(title: str) -> list[str]:
    load = os.getloadavg()[0]
    return [
        f"## {title}",
        "",
        f"{dt.date.today()}, {MACHINE}, torch {torch.__version__}, faiss {faiss.__version__}; torch and FAISS",
        f"limited to 1 thread (the 2 cores are shared with other jobs, load average {load:.1f} at the time;",
        "with 2 threads under that load, thread contention made timings vary 10x between runs).",
    ]


def _clustered_embeddings(groups: int, size: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group: 4 random directions, 4 noisy completions around each (so clusters exist at tau 0.8)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups * 4, dim, generator=generator)  # [B*4, d]
    embeddings = centres.repeat_interleave(size // 4, 0) + 0.3 * torch.randn(groups * size, dim, generator=generator)
    return embeddings, torch.arange(groups).repeat_interleave(size)


def _per_group_faiss(embeddings: torch.Tensor, group_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """The obvious loop: one IndexFlatIP + range search + connected components per group."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1).numpy()
    vectors = unit.astype(np.float32)
    groups = group_ids.numpy()
    local = np.zeros(len(groups), dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors[members])
        lims, _, neighbours = index.range_search(vectors[members], tau - 1e-4)
        rows = np.repeat(np.arange(len(members)), np.diff(lims).astype(np.int64))
        cols = neighbours.astype(np.int64)
        keep = np.einsum("pd,pd->p", unit[members[rows]], unit[members[cols]]) >= tau
        graph = coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(len(members),) * 2)
        _, labels = connected_components(graph, directed=True, connection="weak")
        _, first = np.unique(labels, return_index=True)  # components in order of first appearance
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        local[members] = rank[labels]
    return torch.from_numpy(local)


def _whole_batch_flat(embeddings: torch.Tensor, group_ids: torch.Tensor, tau: float) -> int:
    """One IndexFlatIP range search over all N x N pairs (cross-group links dropped afterwards)."""
    vectors = torch.nn.functional.normalize(embeddings.float(), dim=-1).numpy()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    lims, _, neighbours = index.range_search(vectors, tau - 1e-4)
    groups = group_ids.numpy()
    rows = np.repeat(np.arange(len(groups)), np.diff(lims).astype(np.int64))
    return int((groups[rows] == groups[neighbours]).sum())


def bench_embedding() -> list[str]:
    groups, size, dim, tau = 512, 16, 384, 0.8
    embeddings, group_ids = _clustered_embeddings(groups, size, dim)
    one_pass = embedding_clusters(embeddings, group_ids, tau)
    assert torch.equal(one_pass, _per_group_faiss(embeddings, group_ids, tau)), "per-group loop differs"
    assert torch.equal(one_pass, embedding_clusters_reference(embeddings, group_ids, tau)), "brute force differs"
    clusters = one_pass.view(groups, size).max(1).values.float().add(1).mean().item()
    t_one = time_it(lambda: embedding_clusters(embeddings, group_ids, tau), repeats=7)
    t_loop = time_it(lambda: _per_group_faiss(embeddings, group_ids, tau), repeats=3)
    t_flat = time_it(lambda: _whole_batch_flat(embeddings, group_ids, tau), repeats=3)
    print(f"embedding clustering: one pass {t_one * 1e3:.1f} ms, per-group loop {t_loop * 1e3:.1f} ms "
          f"({t_loop / t_one:.1f}x), whole-batch flat {t_flat * 1e3:.1f} ms")  # fmt: skip
    return [
        *_header("Embedding clustering (bench_clustering.py embedding)"),
        f"{groups} groups x {size} completions = {groups * size}, d = {dim}, tau = {tau}; "
        f"{clusters:.2f} clusters per group on average. All three give identical clusters (asserted, also",
        "against the brute-force per-group reference).",
        "",
        "| implementation | median time | ratio to one pass |",
        "|---|---|---|",
        f"| `embedding_clusters`: one range search, IVF lists = groups (within-group pairs only) "
        f"| {t_one * 1e3:.1f} ms | 1.0x |",
        f"| per-group loop: `IndexFlatIP` + `range_search` + components per group | {t_loop * 1e3:.1f} ms "
        f"| {t_loop / t_one:.1f}x slower |",
        f"| one `IndexFlatIP` range search over all N^2 pairs, cross-group links dropped | {t_flat * 1e3:.1f} ms "
        f"| {t_flat / t_one:.1f}x slower |",
    ]


_ANSWER_FORMS = [
    [r"\frac{1}{2}", "0.5", "1/2", r"\frac12", r"\dfrac{1}{2}", "0.50"],
    ["3", "3.0", "3.00"],
    ["x+1", "1+x", "x + 1"],
    [r"\sqrt{2}", r"2^{1/2}", r"\sqrt 2"],
    [r"\frac{\pi}{2}", r"\pi/2"],
    ["42", "42.0"],
    ["-7", "-7.0"],
    [r"\frac{3}{4}", "0.75", "3/4"],
]


def _realistic_answers(groups: int, size: int, seed: int = 0) -> list[str | None]:
    """Each group mixes 1-4 distinct values, each written in several equivalent forms, plus ~6% None."""
    rng = random.Random(seed)
    answers: list[str | None] = []
    for _ in range(groups):
        values = rng.sample(_ANSWER_FORMS, rng.randint(1, 4))
        for _ in range(size):
            answers.append(None if rng.random() < 0.06 else rng.choice(rng.choice(values)))
    return answers


def bench_answers() -> list[str]:
    groups, size = 512, 16
    answers = _realistic_answers(groups, size)
    group_ids = torch.arange(groups).repeat_interleave(size)
    start = time.perf_counter()
    ids = answer_clusters(answers, group_ids, equivalent=answers_equivalent)
    t_cold = time.perf_counter() - start
    t_warm = time_it(lambda: answer_clusters(answers, group_ids, equivalent=answers_equivalent), repeats=3)
    calls = 0

    def counting(a: str, b: str) -> bool:
        nonlocal calls
        calls += 1
        return answers_equivalent(a, b)

    assert torch.equal(answer_clusters(answers, group_ids, equivalent=counting), ids)
    clusters = ids.view(groups, size).max(1).values.float().add(1).mean().item()
    print(f"answer clustering: cold {t_cold:.2f} s, warm {t_warm * 1e3:.1f} ms, {calls} equivalence checks")
    return [
        *_header("Answer clustering (bench_clustering.py answers)"),
        f"{groups} groups x {size} answers from {len(_ANSWER_FORMS)} values in 2-6 equivalent LaTeX/decimal forms",
        f"(1-4 values per group, ~6% no answer); {clusters:.2f} clusters per group; {calls} math-verify checks",
        "per step after exact-match short-circuits and the per-call pair cache.",
        "",
        "| run | time per step |",
        "|---|---|",
        f"| cold (first step, `answers_equivalent` cache empty, grading process start included) | {t_cold:.2f} s |",
        f"| warm (same answers again: `answers_equivalent` cache hits) | {t_warm * 1e3:.1f} ms |",
    ]


def _signals_loop(group_ids, cluster_ids, embeddings, seq_logprobs, rewards, num_groups) -> dict[str, torch.Tensor]:
    """The same signals with one Python iteration per group (torch ops on each group's slice); embeddings centred
    over the step first, as ``uncertainty_signals`` does by default (METHODS.md 5.1)."""
    out: dict[str, list[float]] = {name: [] for name in ("se", "cd", "bot", "rd")}
    centred = embeddings.double() - embeddings.double().mean(0)  # [N, d]
    for b in range(num_groups):
        idx = (group_ids == b).nonzero().flatten()
        unit = torch.nn.functional.normalize(centred[idx], dim=-1)  # [G, d]
        pi = torch.softmax(seq_logprobs[idx].double(), 0)  # [G]
        _, local = torch.unique(cluster_ids[idx], return_inverse=True)
        masses = torch.zeros(int(local.max()) + 1, dtype=torch.float64).index_add_(0, local, pi)
        out["se"].append(float(-(masses * masses.log()).sum()))
        size = len(idx)
        gram = unit @ unit.T
        out["cd"].append(min(max(1 - float(gram.sum() - gram.trace()) / (size * (size - 1)), 0.0), 1.0))
        centroids = torch.stack([unit[local == k].mean(0) for k in range(len(masses))])
        bary = (masses[:, None] * centroids).sum(0)
        out["bot"].append(float((masses * (centroids - bary).pow(2).sum(-1)).sum()))
        out["rd"].append(min(float(rewards[idx].double().std(unbiased=False)) / 0.5, 1.0))
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in out.items()}


def bench_signals() -> list[str]:
    groups, size, dim = 64, 16, 384
    generator = torch.Generator().manual_seed(0)
    n = groups * size
    group_ids = torch.arange(groups).repeat_interleave(size)
    cluster_ids = torch.randint(0, 4, (n,), generator=generator)
    embeddings = torch.randn(n, dim, generator=generator)
    seq_logprobs = -2 * torch.rand(n, generator=generator)
    rewards = torch.randint(0, 2, (n,), generator=generator).float()

    def vectorised() -> dict[str, torch.Tensor]:
        return uncertainty_signals(
            group_ids, groups, rewards=rewards, cluster_ids=cluster_ids, embeddings=embeddings,
            seq_logprobs=seq_logprobs,
        )[0]  # fmt: skip

    def loop() -> dict[str, torch.Tensor]:
        return _signals_loop(group_ids, cluster_ids, embeddings, seq_logprobs, rewards, groups)

    fast, slow = vectorised(), loop()
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=0, msg=name)
    t_vec, t_loop = time_it(vectorised, repeats=20), time_it(loop, repeats=5)
    print(f"signals: vectorised {t_vec * 1e3:.2f} ms, loop {t_loop * 1e3:.2f} ms ({t_loop / t_vec:.1f}x)")
    return [
        *_header("Uncertainty signals (bench_clustering.py signals)"),
        f"{groups} groups x {size} completions, d = {dim}: SE (Rao), SE_n, CD, BoT (embeddings centred over the",
        "step), RD, U_c and the cluster counts; both give the same values (checked to 1e-5).",
        "",
        "| implementation | median time | ratio |",
        "|---|---|---|",
        f"| vectorised `uncertainty_signals` (segment ops) | {t_vec * 1e3:.2f} ms | 1.0x |",
        f"| per-group Python loop | {t_loop * 1e3:.2f} ms | {t_loop / t_vec:.1f}x slower |",
    ]


SECTIONS = {"embedding": bench_embedding, "answers": bench_answers, "signals": bench_signals}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    for name in names or list(SECTIONS):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; valid: {', '.join(SECTIONS)}")
        write_results_section(f"bench_clustering.{name}", SECTIONS[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
