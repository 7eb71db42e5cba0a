"""scheduler/balance.py's public pieces, each against a reference written here: brute force
over every ring size and over every assignment of sequences to ranks (tiny instances),
exact integer arithmetic, and a plain LPT (longest processing time first)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import CostModel
from scheduler.balance import (
    Schedule,
    best_ring_time,
    greedy_schedule,
    held_tokens,
    item_time,
    resize,
)
from scheduler.sharding import Shard, shard_sequence
from scheduler.specs import cluster_preset, model_preset
from scheduler.topology import Topology

TINY = model_preset("tiny")
LLAMA = model_preset("llama-7b")


def whole(lengths: list[int]) -> list[Shard]:
    return [Shard(seq_id=i, length=n, ring_size=1, offload_ratio=0.0)
            for i, n in enumerate(lengths)]


def slow_links(num_ranks: int, gpus_per_node: int):
    """A CPU cluster whose links are so slow that no ring is ever faster than one rank."""
    cluster = cluster_preset("cpu", num_ranks=num_ranks, gpus_per_node=gpus_per_node)
    return cluster.model_copy(update={"intra_node_bandwidth_gbps": 0.001,
                                      "inter_node_bandwidth_gbps": 0.001})


# --- held_tokens, item_time, resize ------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 2_000_000), percent=st.integers(0, 100))
def test_held_tokens_is_the_exact_ceiling_of_the_kept_share(length, percent):
    sh = Shard(seq_id=0, length=length, ring_size=1, offload_ratio=percent / 100)
    assert held_tokens(sh) == -(-length * (100 - percent) // 100)  # integer ceiling


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 200_000), min_size=1, max_size=20))
def test_item_time_is_the_one_rank_time_of_the_vectorised_formula(lengths):
    # Pass 3 orders sequences by CostModel.single_rank_times (a*s^2 + b*s at once) and
    # the schedule's loads add up item_time (seq_time's per-term sum): they must agree.
    cost = CostModel(LLAMA, cluster_preset("h100", num_ranks=8))
    want = cost.single_rank_times(lengths, [0.0] * len(lengths))
    got = [item_time(sh, cost) for sh in whole(lengths)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 400_000), capacity=st.integers(1_000, 60_000),
       num_ranks=st.sampled_from([8, 16, 24]))
def test_resize_offloads_exactly_what_the_larger_ring_still_needs(length, capacity, num_ranks):
    cost = CostModel(LLAMA, cluster_preset("h100", num_ranks=num_ranks))
    if length > num_ranks * max(capacity, cost.offload_capacity_tokens()):
        return  # does not fit the cluster at all (shard_sequence refuses it)
    sh = shard_sequence(0, length, capacity_tokens=capacity, world_size=num_ranks, cost=cost)
    assert resize(sh, sh.ring_size, capacity, cost) == sh
    for d in range(sh.ring_size, num_ranks + 1):
        x = resize(sh, d, capacity, cost)
        # Eq. 3: each of the d ranks keeps at most `capacity` of the tokens it holds, and
        # offloads no more than that needs (up to the ratio quantum, 1e-6) or than before.
        needed = max(0.0, 1.0 - capacity * d / length)
        assert (x.seq_id, x.length, x.ring_size) == (sh.seq_id, sh.length, d)
        assert length * (1.0 - x.offload_ratio) <= capacity * d * (1 + 1e-12)
        assert needed - 1e-12 <= x.offload_ratio <= min(sh.offload_ratio, needed + 1e-6)


# --- best_ring_time --------------------------------------------------------------------
def brute_force_ring_time(sh: Shard, cost: CostModel, topo: Topology, capacity: int,
                          sizes) -> float:
    """The fastest group time of `sh` over the given ring sizes, each tried in turn."""
    return min(cost.c + cost.seq_time(sh.length, d, bandwidth_gbps=topo.bandwidth_for_size(d),
                                      offload_ratio=resize(sh, d, capacity, cost).offload_ratio)
               for d in sizes)


@pytest.mark.parametrize("preset,num_ranks,gpus_per_node,model", [
    ("h100", 8, 8, LLAMA), ("h100", 24, 8, LLAMA), ("h100", 40, 8, LLAMA),
    ("cpu", 6, 2, TINY), ("cpu", 12, 4, TINY),
])
def test_best_ring_time_is_the_fastest_of_every_ring_size(preset, num_ranks, gpus_per_node,
                                                          model):
    cluster = cluster_preset(preset, num_ranks=num_ranks, gpus_per_node=gpus_per_node)
    cost, topo, pow2 = CostModel(model, cluster), Topology(cluster), Topology(cluster,
                                                                              pow2_rings=True)
    rng = np.random.default_rng(num_ranks)
    for length in map(int, np.exp(rng.uniform(np.log(50), np.log(2_000_000), 40))):
        # Without offload (capacity for one rank's share at the minimum ring): exact.
        plain = Shard(seq_id=0, length=length, ring_size=1, offload_ratio=0.0)
        want = brute_force_ring_time(plain, cost, topo, length, range(1, num_ranks + 1))
        assert best_ring_time(plain, cost, topo, length) == pytest.approx(want, rel=1e-12)
        # With offload where the ring is small, and pow2 rings: a lower bound.
        capacity = max(1, int(0.7 * length / num_ranks))
        if length > num_ranks * max(capacity, cost.offload_capacity_tokens()):
            continue  # does not fit the cluster even with full offload
        sh = shard_sequence(0, length, capacity_tokens=capacity, world_size=num_ranks,
                            cost=cost)
        sizes = range(sh.ring_size, num_ranks + 1)
        bound = best_ring_time(sh, cost, topo, capacity)
        assert bound <= brute_force_ring_time(sh, cost, topo, capacity, sizes) * (1 + 1e-12)
        pow2_sizes = [d for d in sizes if d & (d - 1) == 0]
        if pow2_sizes:
            assert best_ring_time(sh, cost, pow2, capacity) <= brute_force_ring_time(
                sh, cost, pow2, capacity, pow2_sizes) * (1 + 1e-12)


# --- greedy_schedule -------------------------------------------------------------------
def brute_force_makespan(times: list[float], num_ranks: int, c: float) -> float:
    """Best makespan over every assignment of whole sequences to ranks (one pack each)."""
    best = math.inf
    for assign in itertools.product(range(num_ranks), repeat=len(times)):
        loads = [0.0] * num_ranks
        for t, r in zip(times, assign, strict=True):
            loads[r] += t
        best = min(best, max(load + c for load in loads if load > 0))
    return best


def plain_lpt_makespan(times: list[float], num_ranks: int, c: float) -> float:
    """Longest first, each onto the rank that frees up first (lowest rank on ties), every
    sequence charged its own group; then each rank's sequences run as one pack."""
    busy, held = [0.0] * num_ranks, [0.0] * num_ranks
    for i in sorted(range(len(times)), key=lambda i: (-times[i], i)):
        r = min(range(num_ranks), key=lambda r: (busy[r], r))
        busy[r] += c + times[i]
        held[r] += times[i]
    return max(c + t for t in held if t > 0)


def check_valid(schedule: Schedule, shards: list[Shard], cost: CostModel,
                capacity: int) -> None:
    tasks = schedule.tasks(cost)
    placed = sorted(sh.seq_id for t in tasks for sh in t.shards)
    assert placed == [sh.seq_id for sh in shards]  # every sequence exactly once
    minimum = {sh.seq_id: sh.ring_size for sh in shards}
    for t in tasks:
        assert len(set(t.ranks)) == len(t.ranks) and 0 <= min(t.ranks)
        assert max(t.ranks) < schedule.world_size
        assert all(sh.ring_size == len(t.ranks) >= minimum[sh.seq_id] for sh in t.shards)
        if len(t.ranks) == 1:
            assert sum(held_tokens(sh) for sh in t.shards) <= capacity
    # The loads and the timed tasks describe one schedule.
    assert max(t.end_s for t in tasks) == pytest.approx(schedule.loads(cost).max(), rel=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_lies_between_the_optimum_and_plain_lpt(seed):
    # Links too slow for any ring to pay, so the optimum over whole-sequence assignments
    # (brute force) is a true lower bound; lengths within 30% of each other, so every
    # sequence is coarse and the greedy's widest placement target is exactly plain LPT,
    # which it may only improve on.
    rng = np.random.default_rng(seed)
    num_ranks = int(rng.integers(2, 4))
    gpus_per_node = int(rng.choice([1, num_ranks]))
    lengths = [int(x) for x in rng.integers(100, 131, int(rng.integers(1, 7)))]
    cost = CostModel(TINY, slow_links(num_ranks, gpus_per_node))
    topo = Topology(slow_links(num_ranks, gpus_per_node))
    times = [cost.seq_time(n, 1, bandwidth_gbps=1.0) for n in lengths]
    for n, t in zip(lengths, times, strict=True):
        assert all(cost.seq_time(n, d, bandwidth_gbps=topo.bandwidth_for_size(d)) >= t
                   for d in range(2, num_ranks + 1))  # the premise: no ring pays
    capacity = sum(lengths)  # one pack per rank holds everything
    shards = whole(lengths)
    schedule = greedy_schedule(shards, cost=cost, topo=topo, capacity_tokens=capacity)
    check_valid(schedule, shards, cost, capacity)
    makespan = float(schedule.loads(cost).max())
    assert makespan >= brute_force_makespan(times, num_ranks, cost.c) * (1 - 1e-12)
    assert makespan <= plain_lpt_makespan(times, num_ranks, cost.c) * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_schedules_are_valid_with_rings_offload_and_slow_ranks(seed):
    rng = np.random.default_rng(100 + seed)
    cluster = cluster_preset("h100", num_ranks=16)
    cost, topo = CostModel(LLAMA, cluster), Topology(cluster)
    capacity = 16_384
    lengths = [int(x) for x in np.exp(rng.uniform(np.log(200), np.log(400_000), 50))]
    shards = [shard_sequence(i, n, capacity_tokens=capacity, world_size=16, cost=cost)
              for i, n in enumerate(lengths)]
    speeds = None if seed % 2 == 0 else rng.choice([1.0, 0.6], 16)
    schedule = greedy_schedule(shards, cost=cost, topo=topo, capacity_tokens=capacity,
                               speeds=speeds)
    check_valid(schedule, shards, cost, capacity)
    assert any(len(t.ranks) > 1 for t in schedule.tasks(cost))
    # No step ends before its slowest sequence could on its best ring at the top speed.
    top = cost.at_speed(1.0)
    makespan = float(schedule.loads(cost).max())
    assert makespan >= max(best_ring_time(sh, top, topo, capacity) for sh in shards) * (
        1 - 1e-12)


def naive_earliest_finish(times: list[float], speeds: list[float], c: float) -> float:
    """Longest first, each onto whichever rank would finish it first (every rank asked;
    a rank's first sequence opens its one pack, paying c), all at that rank's speed."""
    loads = [0.0] * len(speeds)
    for i in sorted(range(len(times)), key=lambda i: (-times[i], i)):
        finish = [load + (times[i] + (c if load == 0 else 0.0)) / v
                  for load, v in zip(loads, speeds, strict=True)]
        r = min(range(len(speeds)), key=lambda r: (finish[r], -speeds[r], r))
        loads[r] = finish[r]
    return max(loads)


@pytest.mark.parametrize("speeds", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.5],
                                    [1.0, 0.5, 0.5, 0.75], [0.6, 1.0, 1.0]])
def test_short_sequences_go_where_they_finish_first(speeds):
    # Only short sequences (each a few percent of the step): pass 3 alone places them.
    # Its heaps ask only the least-loaded rank of each speed class; asking every rank
    # must give the same schedule.
    rng = np.random.default_rng(len(speeds))
    lengths = [int(x) for x in rng.integers(30, 41, 200)]
    cluster = cluster_preset("cpu", num_ranks=len(speeds), gpus_per_node=len(speeds))
    cost, topo = CostModel(TINY, cluster), Topology(cluster)
    shards = whole(lengths)
    schedule = greedy_schedule(shards, cost=cost, topo=topo, capacity_tokens=sum(lengths),
                               speeds=np.array(speeds))
    check_valid(schedule, shards, cost, sum(lengths))
    assert all(len(t.ranks) == 1 for t in schedule.tasks(cost))
    want = naive_earliest_finish([item_time(sh, cost) for sh in shards], speeds, cost.c)
    assert float(schedule.loads(cost).max()) == pytest.approx(want, rel=1e-9)
