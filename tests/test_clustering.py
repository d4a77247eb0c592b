"""Semantic clustering (METHODS.md §3): FAISS batch search vs brute force, threshold edges, answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_gcpo.algorithms.clustering import (
    answer_clusters,
    embedding_clusters,
    embedding_clusters_reference,
    pair_cosines,
)
from lit_gcpo.rewards.answers import answers_equivalent


def _angles(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_links_are_transitive_and_stay_inside_groups() -> None:
    # Group 0 at 0, 40, 80 degrees with tau = cos 45 = 0.707: 0-40 (cos 40 = 0.766) and 40-80 link,
    # 0-80 (cos 80 = 0.17) does not, yet the chain makes one component. Group 1 repeats the 0-degree vector
    # (identical to group 0's first) next to a 180-degree one: its own ids restart at 0, and the two
    # vectors do not link (cos = -1). Group 2: a single completion.
    embeddings = _angles(0, 40, 80, 0, 180, 90)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    tau = math.cos(math.radians(45))
    expected = torch.tensor([0, 0, 0, 0, 1, 0])
    assert torch.equal(embedding_clusters(embeddings, group_ids, tau), expected)
    assert torch.equal(embedding_clusters_reference(embeddings, group_ids, tau), expected)


def test_threshold_is_inclusive() -> None:
    # tau equal to the exact (float64) cosine of a pair links it; the next float above does not.
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(2, 16, generator=generator)
    group_ids = torch.tensor([0, 0])
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1).numpy()
    cosine = float(pair_cosines(unit, np.array([0]), np.array([1]))[0])
    assert torch.equal(embedding_clusters(embeddings, group_ids, cosine), torch.tensor([0, 0]))
    above = float(np.nextafter(cosine, 2.0))
    assert torch.equal(embedding_clusters(embeddings, group_ids, above), torch.tensor([0, 1]))
    assert torch.equal(embedding_clusters_reference(embeddings, group_ids, above), torch.tensor([0, 1]))
    # tau = 1: only identical directions link ((1, 0) and (3, 0) normalise to exactly the same vector, so
    # their float64 cosine is exactly 1); tau = -1: everything in the group links.
    same = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert torch.equal(embedding_clusters(same, torch.zeros(3, dtype=torch.long), 1.0), torch.tensor([0, 0, 1]))
    assert torch.equal(embedding_clusters(same, torch.zeros(3, dtype=torch.long), -1.0), torch.tensor([0, 0, 0]))


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    seed=st.integers(0, 2**31 - 1),
    tau=st.floats(-0.2, 0.95),
    shuffle=st.booleans(),
    tie=st.booleans(),
)
def test_faiss_matches_brute_force(sizes: list[int], seed: int, tau: float, shuffle: bool, tie: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle:
        group_ids = group_ids[torch.randperm(len(group_ids), generator=generator)]
    n = len(group_ids)
    # Few directions plus noise, so groups hold several multi-member clusters.
    centres = torch.randn(3, 8, generator=generator)
    embeddings = centres[torch.randint(0, 3, (n,), generator=generator)] + 0.4 * torch.randn(n, 8, generator=generator)
    if tie and n >= 2:  # put tau exactly on the cosine of the first pair of a group
        members = (group_ids == group_ids[0]).nonzero().flatten()
        if len(members) >= 2:
            unit = torch.nn.functional.normalize(embeddings.double(), dim=-1).numpy()
            tau = float(pair_cosines(unit, members[:1].numpy(), members[1:2].numpy())[0])
    got = embedding_clusters(embeddings, group_ids, tau)
    expected = embedding_clusters_reference(embeddings, group_ids, tau)
    assert torch.equal(got, expected)


def test_embedding_clusters_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tau"):
        embedding_clusters(torch.randn(2, 3), torch.tensor([0, 0]), 1.5)
    with pytest.raises(ValueError, match="group_ids"):
        embedding_clusters(torch.randn(2, 3), torch.tensor([0, 0, 0]), 0.5)


def test_answer_clusters_with_injected_equivalence() -> None:
    calls: list[tuple[str, str]] = []

    def equivalent(a: str, b: str) -> bool:
        calls.append((a, b))
        return a.replace(" ", "") == b.replace(" ", "")

    # Group 0: "x+1" / "x + 1" equivalent, "2" new, None singleton, "x+1" identical (no call needed).
    # Group 1: local ids restart; "2" again; "" (empty) is a singleton like None.
    answers = ["x+1", "x + 1", "2", None, "x+1", "2", "", "x + 1"]
    group_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    ids = answer_clusters(answers, group_ids, equivalent=equivalent)
    assert ids.tolist() == [0, 0, 1, 2, 0, 0, 1, 2]
    # Calls: ("x + 1","x+1") once (cached, symmetric key); "2" vs "x+1": group 0 compares "2" with rep "x+1"
    # once, and group 1 compares "x + 1" with rep "2" once -> 3 distinct pairs, none repeated.
    assert len(calls) == len(set(calls)) == 3
    assert all(a != b for a, b in calls)


def test_answer_clusters_math_verify_equivalent_forms() -> None:
    answers = [r"\frac12", "0.5", "1/2", r"\frac{1}{3}", None, "0.50"]
    ids = answer_clusters(answers, torch.zeros(6, dtype=torch.long), equivalent=answers_equivalent)
    assert ids.tolist() == [0, 0, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="answers has 2"):
        answer_clusters(["1", "2"], torch.zeros(3, dtype=torch.long), equivalent=answers_equivalent)
