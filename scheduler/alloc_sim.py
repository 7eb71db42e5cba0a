"""Simulation of PyTorch's CUDA caching allocator, to measure fragmentation on a trace.

MEMO (arXiv 2407.12117, Sec. 2.3 and Fig. 3) motivates planned addresses by the memory a
caching allocator reserves beyond what is live. This module replays an allocation trace
through the same policy as c10/cuda/CUDACachingAllocator.cpp (default settings, one
stream, no expandable segments):

- request sizes round up to 512 B; requests <= 1 MiB use the small pool, others the large;
- a new segment (cudaMalloc) is 2 MiB for small requests, 20 MiB for requests < 10 MiB,
  else the request rounded up to 2 MiB;
- best fit: the smallest cached free block of the pool that holds the request, lowest
  address on ties; the block is split when the remainder is >= 512 B (small pool) or
  > 1 MiB (large pool), the request taking the front;
- a freed block merges with free neighbours of its segment and stays cached;
- when a new segment would exceed `capacity_bytes`, every fully free segment is released
  (as `release_cached_blocks` does) and the malloc retried; failing that, out of memory.

Peak reserved bytes against peak allocated bytes is the fragmentation a static plan
removes. Pure Python, torch-free; O(number of free blocks) per event at worst.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_BLOCK_SIZE = 512                 # kMinBlockSize: every request rounds up to this
SMALL_SIZE = 1 << 20                 # kSmallSize: largest request of the small pool
SMALL_BUFFER = 2 << 20               # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 << 20              # kLargeBuffer: segment size for requests < 10 MiB
MIN_LARGE_ALLOC = 10 << 20           # kMinLargeAlloc
ROUND_LARGE = 2 << 20                # kRoundLarge: larger segments round up to this


@dataclass(kw_only=True)
class _Block:
    segment: int           # id of the segment (cudaMalloc) the block belongs to
    address: int           # start address (segments are laid out one after another)
    size: int              # bytes
    small: bool            # which pool
    allocated: bool = False
    prev: _Block | None = field(default=None, repr=False)
    next: _Block | None = field(default=None, repr=False)

    def key(self) -> tuple[int, int]:
        return (self.size, self.address)


@dataclass(frozen=True, kw_only=True)
class AllocatorStats:
    """What the simulated allocator did over one trace."""

    peak_reserved_bytes: int     # most bytes held in segments at once (what nvidia-smi shows)
    peak_allocated_bytes: int    # most bytes in allocated blocks at once (after rounding)
    peak_requested_bytes: int    # most bytes requested and live at once (max-live)
    num_segment_allocs: int      # cudaMalloc calls
    num_segment_frees: int       # cudaFree calls made to recover from a capacity miss
    out_of_memory: bool          # a request could not be served within capacity_bytes

    @property
    def fragmentation(self) -> float:
        """Share of the reserved peak that was never live at the requested peak."""
        if self.peak_reserved_bytes == 0:
            return 0.0
        return 1.0 - self.peak_requested_bytes / self.peak_reserved_bytes


class CachingAllocatorSim:
    """Replays malloc/free calls with the caching allocator's policy (see module doc)."""

    def __init__(self, *, capacity_bytes: int | None = None):
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes={capacity_bytes!r} must be > 0 or None")
        self.capacity_bytes = capacity_bytes
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        self._blocks: dict[tuple[int, int], _Block] = {}     # free blocks by key
        self._segments: dict[int, _Block] = {}               # first block of each segment
        self._segment_sizes: dict[int, int] = {}
        self._requests: dict[int, int] = {}                  # requested bytes by id(block)
        self._next_address = 0
        self.reserved = self.allocated = self.requested = 0
        self.peak_reserved = self.peak_allocated = self.peak_requested = 0
        self.num_segment_allocs = self.num_segment_frees = 0

    def malloc(self, size: int) -> _Block | None:
        """A block for `size` bytes, or None when capacity_bytes is exhausted."""
        if size < 0:
            raise ValueError(f"size={size} must be >= 0 bytes")
        rounded = max(MIN_BLOCK_SIZE, -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE)
        small = rounded <= SMALL_SIZE
        block = self._take_free(rounded, small) or self._new_segment(rounded, small)
        if block is None:
            return None
        self._split(block, rounded)
        block.allocated = True
        self.allocated += block.size
        self.requested += size
        self._requests[id(block)] = size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)
        return block

    def free(self, block: _Block) -> None:
        """Return `block` to its pool, merged with its free neighbours."""
        if not block.allocated:
            raise ValueError(f"block at address {block.address} is not allocated (double free)")
        block.allocated = False
        self.allocated -= block.size
        self.requested -= self._requests.pop(id(block))
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                block = _merge(block, neighbour)
        self._add_free(block)

    def replay(self, sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]]) -> bool:
        """Run one trace on this allocator, keeping its cache from earlier traces (as a
        training loop does from step to step); False if it ran out of memory."""
        return _replay(self, sizes, lifetimes)

    def stats(self, *, out_of_memory: bool = False) -> AllocatorStats:
        return AllocatorStats(
            peak_reserved_bytes=self.peak_reserved, peak_allocated_bytes=self.peak_allocated,
            peak_requested_bytes=self.peak_requested, num_segment_allocs=self.num_segment_allocs,
            num_segment_frees=self.num_segment_frees, out_of_memory=out_of_memory)

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        block = self._blocks[pool[i]]
        self._remove_free(block)
        return block

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        segment_size = _segment_size(size)
        if self._exceeds(segment_size):
            self._release_free_segments()
            if self._exceeds(segment_size):
                return None
        seg_id = self.num_segment_allocs
        self.num_segment_allocs += 1
        block = _Block(segment=seg_id, address=self._next_address, size=segment_size, small=small)
        self._next_address += segment_size
        self._segments[seg_id] = block
        self._segment_sizes[seg_id] = segment_size
        self.reserved += segment_size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _exceeds(self, extra: int) -> bool:
        return self.capacity_bytes is not None and self.reserved + extra > self.capacity_bytes

    def _release_free_segments(self) -> None:
        for seg_id, first in list(self._segments.items()):
            if not first.allocated and first.next is None:   # one free block = whole segment
                self._remove_free(first)
                del self._segments[seg_id]
                self.reserved -= self._segment_sizes.pop(seg_id)
                self.num_segment_frees += 1

    def _split(self, block: _Block, size: int) -> None:
        remaining = block.size - size
        threshold_ok = remaining >= MIN_BLOCK_SIZE if block.small else remaining > SMALL_SIZE
        if not threshold_ok:
            return
        rest = _Block(segment=block.segment, address=block.address + size, size=remaining,
                      small=block.small, prev=block, next=block.next)
        if block.next is not None:
            block.next.prev = rest
        block.next = rest
        block.size = size
        self._add_free(rest)

    def _add_free(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], block.key())
        self._blocks[block.key()] = block

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, block.key())
        assert pool[i] == block.key(), "free block missing from its pool"
        pool.pop(i)
        del self._blocks[block.key()]


def _merge(block: _Block, neighbour: _Block) -> _Block:
    """Fold two adjacent free blocks into the left one (so a segment's first block stays)."""
    if neighbour is block.prev:
        neighbour.size += block.size
        neighbour.next = block.next
        if block.next is not None:
            block.next.prev = neighbour
        return neighbour
    block.size += neighbour.size
    block.next = neighbour.next
    if neighbour.next is not None:
        neighbour.next.prev = block
    return block


def _segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def simulate_caching_allocator(
    sizes: Sequence[int], lifetimes: Sequence[tuple[int, int]], *,
    capacity_bytes: int | None = None,
) -> AllocatorStats:
    """Replay one trace on a fresh allocator (see `CachingAllocatorSim.replay`)."""
    sim = CachingAllocatorSim(capacity_bytes=capacity_bytes)
    ok = sim.replay(sizes, lifetimes)
    return sim.stats(out_of_memory=not ok)


def _replay(sim: CachingAllocatorSim, sizes: Sequence[int],
            lifetimes: Sequence[tuple[int, int]]) -> bool:
    """At each op, allocate the tensors born there (in index order), then free those whose
    last op it is. False at the first out-of-memory (what was allocated stays)."""
    if len(sizes) != len(lifetimes):
        raise ValueError(f"sizes has {len(sizes)} entries but lifetimes has {len(lifetimes)}")
    born: dict[int, list[int]] = {}
    dying: dict[int, list[int]] = {}
    for i, (first, last) in enumerate(lifetimes):
        if not 0 <= first <= last:
            raise ValueError(f"lifetimes[{i}]={(first, last)!r} must satisfy 0 <= first <= last")
        born.setdefault(first, []).append(i)
        dying.setdefault(last, []).append(i)
    blocks: dict[int, _Block] = {}
    for op in sorted(set(born) | set(dying)):
        for i in born.get(op, ()):
            block = sim.malloc(int(sizes[i]))
            if block is None:
                return False
            blocks[i] = block
        for i in dying.get(op, ()):
            sim.free(blocks.pop(i))
    return True


def fragmentation_ratio(stats: AllocatorStats, planned_peak_bytes: int) -> float:
    """Simulated reserved peak over a static plan's peak (how much more the cache needs)."""
    return stats.peak_reserved_bytes / planned_peak_bytes if planned_peak_bytes else math.nan
