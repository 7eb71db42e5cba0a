"""Data-aware sharding (Alg. 1, Eq. 3) against a brute-force search over ring sizes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.cost import CostModel
from scheduler.errors import InfeasibleBatchError
from scheduler.sharding import best_fit_packs, shard_batch, shard_sequence
from scheduler.specs import cluster_preset, model_preset

H100 = CostModel(model_preset("llama-7b"), cluster_preset("h100", num_ranks=64))
CPU = CostModel(model_preset("tiny"), cluster_preset("cpu", num_ranks=4))


def brute_force_min_ring(s: int, C: int, N: int, c_off: int) -> int | None:
    """Smallest d in 1..N on which each member holds at most C tokens (plain) or, with
    MEMO offload, at most C_off."""
    for d in range(1, N + 1):
        if s / d <= max(C, c_off):
            return d
    return None


@settings(max_examples=200, deadline=None)
@given(s=st.integers(1, 5_000_000), C=st.integers(1, 40_000), N=st.integers(1, 300))
def test_auto_policy_finds_the_smallest_ring(s, C, N):
    c_off = H100.offload_capacity_tokens()
    want = brute_force_min_ring(s, C, N, c_off)
    if want is None:
        with pytest.raises(InfeasibleBatchError):
            shard_sequence(0, s, capacity_tokens=C, world_size=N, cost=H100)
        return
    sh = shard_sequence(0, s, capacity_tokens=C, world_size=N, cost=H100)
    assert sh.ring_size == want
    assert s * (1 - sh.offload_ratio) / sh.ring_size <= C * (1 + 1e-9)  # the token rule
    assert s / sh.ring_size <= (C if sh.offload_ratio == 0 else c_off)  # what really fits
    assert sh.offload_ratio == 0.0 or sh.offload_ratio - max(0, 1 - C * want / s) < 2e-6


@settings(max_examples=200, deadline=None)
@given(s=st.integers(1, 3_000_000), C=st.integers(1, 5_000), N=st.integers(1, 64))
def test_needed_policy_offloads_only_beyond_all_ranks(s, C, N):
    c_off = CPU.offload_capacity_tokens()
    if s > N * max(C, c_off):
        with pytest.raises(InfeasibleBatchError):
            shard_sequence(3, s, capacity_tokens=C, world_size=N, cost=CPU, offload="needed")
        return
    sh = shard_sequence(3, s, capacity_tokens=C, world_size=N, cost=CPU, offload="needed")
    assert sh.ring_size == min(N, math.ceil(s / C))
    assert (sh.offload_ratio > 0) == (s > N * C)
    assert s * (1 - sh.offload_ratio) / sh.ring_size <= C * (1 + 1e-9)


def test_worker_example_rings_on_cpu():
    shards = shard_batch([200, 150, 90, 40, 7], capacity_tokens=64, world_size=4, cost=CPU,
                         offload="needed")
    assert [sh.ring_size for sh in shards] == [4, 3, 2, 1, 1]
    assert all(sh.offload_ratio == 0 for sh in shards)


def test_no_power_of_two_or_divisibility_restriction():
    shards = shard_batch([65, 129, 321], capacity_tokens=64, world_size=7, cost=CPU,
                         offload="never")
    assert [sh.ring_size for sh in shards] == [2, 3, 6]


def test_infeasible_names_the_largest_fitting_length():
    limit = 4 * CPU.offload_capacity_tokens()  # MEMO offload on all 4 ranks
    assert shard_sequence(0, limit, capacity_tokens=64, world_size=4, cost=CPU,
                          offload="needed").ring_size == 4
    with pytest.raises(InfeasibleBatchError) as exc:
        shard_batch([3, limit + 1], capacity_tokens=64, world_size=4, cost=CPU,
                    offload="needed")
    assert (exc.value.seq_id, exc.value.length, exc.value.max_length) == (1, limit + 1, limit)
    with pytest.raises(InfeasibleBatchError) as exc:
        shard_batch([257], capacity_tokens=64, world_size=4, cost=CPU, offload="never")
    assert exc.value.max_length == 256


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lengths=[]), "batch is empty"),
    (dict(lengths=[4, -1]), r"lengths\[1\]=-1"),
    (dict(capacity_tokens=0), "capacity_tokens=0"),
    (dict(world_size=0), "world_size=0"),
    (dict(offload="sometimes"), "offload='sometimes'"),
])
def test_bad_arguments(kwargs, message):
    args = dict(lengths=[4, 5], capacity_tokens=8, world_size=2, cost=CPU)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        shard_batch(args.pop("lengths"), **args)


def brute_force_min_bins(sizes: list[int], cap: int) -> int:
    best = len(sizes)

    def go(i: int, bins: list[int]):
        nonlocal best
        if len(bins) >= best:
            return
        if i == len(sizes):
            best = len(bins)
            return
        for k in range(len(bins)):
            if bins[k] + sizes[i] <= cap:
                bins[k] += sizes[i]
                go(i + 1, bins)
                bins[k] -= sizes[i]
        go(i + 1, [*bins, sizes[i]])

    go(0, [])
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=9))
def test_best_fit_packs_are_valid_and_near_optimal(lengths):
    shards = shard_batch(lengths, capacity_tokens=64, world_size=1, cost=CPU, offload="never")
    packs = best_fit_packs(shards, capacity_tokens=64)
    assert sorted(sh.seq_id for p in packs for sh in p) == list(range(len(lengths)))
    assert all(sum(sh.length for sh in p) <= 64 for p in packs)
    # Best-fit decreasing uses at most 11/9 OPT + 6/9 bins (Dosa 2007).
    assert len(packs) <= 11 / 9 * brute_force_min_bins(lengths, 64) + 6 / 9
