"""Zigzag sharding of packed varlen batches, against numpy's array_split as the reference.

np.array_split(range(L), 2d) puts the L % 2d extra tokens in the first chunks, which is the
scheme parallelism/zigzag.py documents; the tests rebuild every shard from it directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallelism.zigzag import (
    ZigzagLayout,
    zigzag_chunk_bounds,
    zigzag_index,
    zigzag_shard,
    zigzag_unshard,
)

LENGTH_SETS = [[1, 5, 127, 1000], [3], [0, 7, 2], [16, 1, 1, 9]]


def _cu(lengths):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def _expected_rows(lengths, d, j):
    """Global rows and positions of position j's shard, straight from np.array_split."""
    rows, pos, start = [], [], 0
    for n in lengths:
        chunks = np.array_split(np.arange(n), 2 * d)
        for c in (j, 2 * d - 1 - j):
            rows.extend(start + chunks[c])
            pos.extend(chunks[c])
        start += n
    return rows, pos


@pytest.mark.parametrize("lengths", LENGTH_SETS)
@pytest.mark.parametrize("d", [1, 2, 3, 4, 8])
def test_shard_matches_array_split(lengths, d):
    x = torch.randn(sum(lengths), 2, 3, dtype=torch.float64)
    seen = []
    for j in range(d):
        x_local, cu_local, pos_local = zigzag_shard(x, _cu(lengths), d, j)
        rows, pos = _expected_rows(lengths, d, j)
        assert torch.equal(x_local, x[torch.tensor(rows, dtype=torch.int64)])
        assert pos_local.tolist() == [int(p) for p in pos]
        assert cu_local.dtype == torch.int32 and int(cu_local[-1]) == len(rows)
        local_lengths = np.diff(cu_local.numpy())
        want = [len(np.array_split(np.arange(n), 2 * d)[j])
                + len(np.array_split(np.arange(n), 2 * d)[2 * d - 1 - j]) for n in lengths]
        assert local_lengths.tolist() == want
        seen.extend(rows)
    assert sorted(seen) == list(range(sum(lengths)))  # every token exactly once


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_unshard_inverts_shard(d):
    lengths = [1, 5, 127, 10]
    x = torch.randn(sum(lengths), 4)
    shards = [zigzag_shard(x, _cu(lengths), d, j)[0] for j in range(d)]
    assert torch.equal(zigzag_unshard(shards, _cu(lengths)), x)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 127, 1000])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 8])
def test_balance_within_one_token(n, d):
    layout = ZigzagLayout(lengths=(n,), ring_size=d)
    sizes = np.diff(zigzag_chunk_bounds(n, d))
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    held = [layout.local_lengths(j)[0] for j in range(d)]
    assert max(held) - min(held) <= 1 and sum(held) == n


def test_local_rows_pick_each_sequences_two_chunks():
    lengths = (11, 3, 0, 6)
    layout = ZigzagLayout(lengths=lengths, ring_size=3)
    for j in range(3):
        pos = layout.position_ids(j)
        for part, chunk in (("first", j), ("second", 5 - j)):
            rows = layout.local_rows(j, part)
            want = np.concatenate([np.array_split(np.arange(n), 6)[chunk] for n in lengths])
            assert pos[rows].tolist() == want.tolist()
            sizes = [len(np.array_split(np.arange(n), 6)[chunk]) for n in lengths]
            assert layout.local_cu_seqlens(j, part=part).tolist() == np.concatenate(
                [[0], np.cumsum(sizes)]).tolist()


def test_index_matches_shard():
    lengths = [9, 4]
    x = torch.arange(13)
    idx = zigzag_index(_cu(lengths), 2, 1)
    assert torch.equal(x[idx], zigzag_shard(x, _cu(lengths), 2, 1)[0])


def test_from_local_lengths_recovers_and_rejects():
    layout = ZigzagLayout(lengths=(1, 5, 127), ring_size=3)
    got = ZigzagLayout.from_local_lengths([layout.local_lengths(j) for j in range(3)])
    assert got == layout
    wrong = [layout.local_lengths(j) for j in range(3)]
    wrong[0], wrong[1] = wrong[1], wrong[0]
    if wrong[0] != wrong[1]:
        with pytest.raises(ValueError, match="ring position 0 holds"):
            ZigzagLayout.from_local_lengths(wrong)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ring_size": 0, "ring_index": 0}, "ring_size must be an int >= 1"),
        ({"ring_size": 2, "ring_index": 2}, r"ring_index must be an int in \[0, 1\]"),
        ({"ring_size": 2, "ring_index": -1}, "ring_index"),
    ],
)
def test_bad_ring_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zigzag_shard(torch.zeros(4), _cu([4]), **kwargs)


def test_bad_cu_seqlens_and_rows_raise():
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        zigzag_shard(torch.zeros(4), torch.tensor([1, 4]), 2, 0)
    with pytest.raises(ValueError, match="nondecreasing"):
        zigzag_shard(torch.zeros(4), torch.tensor([0, 3, 2, 4]), 2, 0)
    with pytest.raises(ValueError, match="with 4 rows"):
        zigzag_shard(torch.zeros(5), _cu([4]), 2, 0)
    with pytest.raises(ValueError, match=r"x_shards\[1\] must have"):
        zigzag_unshard([torch.zeros(2), torch.zeros(5)], _cu([4]))
