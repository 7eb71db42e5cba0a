"""Caching-allocator simulation: hand-worked cases of PyTorch's policy plus invariants.

Expected numbers come from the constants of c10/cuda/CUDACachingAllocator.cpp (512 B
rounding, 1 MiB small/large split, 2 MiB / 20 MiB segments), worked out by hand below.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.alloc_sim import CachingAllocatorSim, simulate_caching_allocator

MiB = 1 << 20


def test_small_requests_share_one_2mib_segment():
    sim = CachingAllocatorSim()
    a, b = sim.malloc(100), sim.malloc(1000)
    assert (a.size, b.size) == (512, 1024)            # rounded up to 512 B multiples
    assert a.segment == b.segment and sim.reserved == 2 * MiB
    assert b.address == a.address + 512               # the request takes the block's front


def test_mid_requests_get_a_20mib_segment_and_large_ones_round_to_2mib():
    sim = CachingAllocatorSim()
    sim.malloc(3 * MiB)
    assert sim.reserved == 20 * MiB
    sim.malloc(17 * MiB)                               # fits the 17 MiB left of that segment
    assert sim.reserved == 20 * MiB
    sim.malloc(11 * MiB + 1)
    assert sim.reserved == 20 * MiB + 12 * MiB         # 11 MiB + 512 B rounds up to 12 MiB


def test_large_remainder_of_at_most_1mib_is_not_split():
    sim = CachingAllocatorSim()
    big = sim.malloc(12 * MiB)
    sim.free(big)
    again = sim.malloc(11 * MiB + 512 * 1024)          # leaves 512 KiB: kept inside the block
    assert again.size == 12 * MiB and sim.allocated == 12 * MiB


def test_best_fit_takes_the_smallest_cached_block():
    sim = CachingAllocatorSim()
    blocks = [sim.malloc(s * MiB) for s in (30, 12, 20)]
    for block in blocks:
        sim.free(block)
    # Three separate segments of 30, 12, 20 MiB are cached; 11 MiB goes to the 12 MiB one.
    chosen = sim.malloc(11 * MiB)
    assert chosen.segment == blocks[1].segment
    assert sim.num_segment_allocs == 3


def test_free_merges_neighbours_and_the_merged_block_is_reused():
    sim = CachingAllocatorSim()
    a, b, c = sim.malloc(8 * MiB), sim.malloc(6 * MiB), sim.malloc(6 * MiB)
    assert a.segment == b.segment == c.segment          # one 20 MiB segment
    sim.free(a)
    sim.free(b)                                         # merges with a: 14 MiB free block
    d = sim.malloc(13 * MiB)
    assert d.address == a.address and sim.num_segment_allocs == 1


def test_capacity_miss_releases_free_segments_then_retries():
    sim = CachingAllocatorSim(capacity_bytes=40 * MiB)
    a = sim.malloc(30 * MiB)
    sim.free(a)                                         # 30 MiB cached, unused
    b = sim.malloc(32 * MiB)                            # cannot fit 30 + 32 > 40: release
    assert b is not None and sim.num_segment_frees == 1 and sim.reserved == 32 * MiB
    assert sim.malloc(10 * MiB) is None                 # 32 + 10 > 40 and nothing to release


def test_fragmentation_on_a_trace_where_holes_strand():
    # 12 MiB + 12 MiB live, the first freed, then 14 MiB: the hole of 12 is too small, so
    # a fresh segment is reserved although only 26 MiB are ever live at once.
    sizes = [12 * MiB, 12 * MiB, 14 * MiB]
    lifetimes = [(0, 1), (1, 3), (2, 3)]
    stats = simulate_caching_allocator(sizes, lifetimes)
    assert stats.peak_requested_bytes == 26 * MiB
    assert stats.peak_reserved_bytes == 38 * MiB
    assert stats.fragmentation == pytest.approx(1 - 26 / 38)


def test_double_free_and_bad_trace_raise():
    sim = CachingAllocatorSim()
    block = sim.malloc(10)
    sim.free(block)
    with pytest.raises(ValueError, match="not allocated"):
        sim.free(block)
    with pytest.raises(ValueError, match=r"lifetimes\[0\]"):
        simulate_caching_allocator([1], [(3, 1)])
    with pytest.raises(ValueError, match="capacity_bytes=0"):
        CachingAllocatorSim(capacity_bytes=0)


traces = st.lists(
    st.tuples(st.integers(1, 40 * MiB), st.integers(0, 20), st.integers(0, 6)),
    min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(traces)
def test_live_blocks_never_overlap_and_peaks_are_ordered(rows):
    sim = CachingAllocatorSim()
    live: dict[int, object] = {}
    events = sorted([(r[1], 0, i) for i, r in enumerate(rows)]
                    + [(r[1] + r[2], 1, i) for i, r in enumerate(rows)])
    for _, kind, i in events:
        if kind == 0:
            live[i] = sim.malloc(rows[i][0])
            spans = sorted((b.address, b.address + b.size) for b in live.values())
            assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))
        else:
            sim.free(live.pop(i))
    stats = sim.stats()
    assert stats.peak_requested_bytes <= stats.peak_allocated_bytes <= stats.peak_reserved_bytes
    assert sim.allocated == 0 and sim.requested == 0


def test_cache_carries_over_between_steps_of_different_lengths():
    # Step 1 caches a 30 MiB and a 12 MiB segment; step 2 asks for 36 MiB live at once
    # (two 18 MiB): neither cached segment can serve 18 MiB twice, so it reserves more
    # than a fresh allocator would.
    sim = CachingAllocatorSim()
    assert sim.replay([30 * MiB, 12 * MiB], [(0, 1), (1, 1)])
    assert sim.replay([18 * MiB, 18 * MiB], [(0, 1), (1, 1)])
    fresh = simulate_caching_allocator([18 * MiB, 18 * MiB], [(0, 1), (1, 1)])
    assert sim.stats().peak_reserved_bytes == 30 * MiB + 12 * MiB + 18 * MiB
    assert fresh.peak_reserved_bytes == 36 * MiB
