"""Balance scheduler, greedy part (ByteScale, arXiv 2502.21231, Alg. 2).

Input: the shards of Alg. 1 (each sequence's minimum ring D(s) and offload ratio). Output:
a `Schedule` that says which ranks run which ring and which short sequences, in what
order, so that all ranks finish the step together. Three passes:

1. Ring sizes. D(s) is only the memory minimum; a long sequence on its minimum ring can
   take far longer than the rest of the step. With the target T* = the perfect-balance
   bound (total compute / ranks, and the longest sequence's best ring), every sequence
   gets the smallest ring d >= D(s) with T(s, d) <= T*, searched only where ring
   communication still hides behind compute (beyond that a larger ring buys nothing but
   exposed communication).
2. Rings, largest first, onto the ranks that free up earliest (Alg. 2), topology-aware: a
   ring of d <= gpus_per_node ranks goes inside one node (the node where d ranks are free
   soonest, least idle on ties); a larger ring takes whole nodes plus one partial node,
   i.e. the fewest nodes that can hold it.
3. Short sequences (ring size 1), longest first, onto the least-loaded rank (LPT), packed
   per rank into micro-batches of at most capacity_tokens (best-fit decreasing).

A rank runs its rings first, then its packs; ring members start together (the scheduler
waits for the last one). `scheduler.lns` then improves pass 3 with CP-SAT.

Ranks of different speeds (node pools, measured stragglers; `CostModel.at_speed`): the
target is the total work over the ranks' summed speed; a ring runs at its slowest
member's speed, so pass 2 weighs, per speed class, placing the ring only on ranks at
least that fast (a ring of fast ranks is not held back by a slow one) and keeps the
placement that ends first; pass 3 puts each short sequence where it finishes earliest at
that rank's speed. Each rank packs up to its own capacity (node pools of different
memory). With every speed 1 and one capacity this is exactly the uniform scheduler.

Public: `greedy_schedule` (passes 1-3) and the `Schedule` / `Task` it returns, `resize`,
and the per-sequence figures the LNS and the simulator share with it (`item_time`,
`held_tokens`, `best_ring_time`, `pack_fixed_singles`). Everything prefixed `_` is the
passes' own machinery.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from scheduler.cost import CostModel
from scheduler.sharding import Shard, best_fit_packs, shard_sequence
from scheduler.topology import Topology

__all__ = ["Schedule", "Task", "best_ring_time", "greedy_schedule", "held_tokens", "item_time",
           "pack_fixed_singles", "resize"]

# Pass 2 targets, as multiples of the balance bound; 0 means "finish each ring earliest",
# inf "every ring on its memory minimum D(s)" (best when per-group overhead dominates).
PLACEMENT_TARGETS = (1.0, 1.05, 0.0, math.inf)
# A short sequence longer than this share of the target is placed with the rings (pass 2),
# where it may get a ring of its own to fill a gap, rather than by LPT at the end.
GRAIN = 0.05
# Rings past their hiding limit are tried only while (rings placed) x (ranks) stays under
# this, which keeps the plan time of 4,096+ rank clusters within budget.
FASTEST_MODE_CAP = 8_000_000


@dataclass(frozen=True, kw_only=True)
class Task:
    """A group placed on ranks at a time: a ring (or packed rank) and its sequences."""

    ranks: tuple[int, ...]  # ring order
    shards: tuple[Shard, ...]  # sequences, with the offload ratio for this ring size
    start_s: float  # when all its ranks are free
    duration_s: float  # per-rank time of the group

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass(kw_only=True)
class Schedule:
    """Rings placed in time, then per-rank lists of short sequences (packed on demand)."""

    world_size: int
    capacity_tokens: int  # the smallest rank capacity (what rings are sized by)
    rings: list[Task]  # multi-rank (or enlarged) groups, each at its start time
    base_s: np.ndarray  # float64[world_size]: when each rank's ring phase ends
    items: list[list[Shard]] = field(default_factory=list)  # short sequences per rank
    speeds: np.ndarray | None = None  # float64[world_size] rank speeds (None: all 1)
    capacities: np.ndarray | None = None  # int64[world_size] (None: all capacity_tokens)

    def speed(self, rank: int) -> float:
        return 1.0 if self.speeds is None else float(self.speeds[rank])

    def capacity(self, rank: int) -> int:
        return self.capacity_tokens if self.capacities is None else int(self.capacities[rank])

    def packs_of(self, rank: int) -> list[list[Shard]]:
        return best_fit_packs(self.items[rank], capacity_tokens=self.capacity(rank))

    def load_of(self, rank: int, items: Sequence[Shard], cost: CostModel) -> float:
        """When `rank` would finish holding `items` after its rings (at its speed)."""
        return self.base_s[rank] + _short_load(items, cost.at_speed(self.speed(rank)),
                                               self.capacity(rank))

    def rank_load(self, rank: int, cost: CostModel) -> float:
        return self.load_of(rank, self.items[rank], cost)

    def loads(self, cost: CostModel) -> np.ndarray:
        return np.array([self.rank_load(r, cost) for r in range(self.world_size)])

    def tasks(self, cost: CostModel) -> list[Task]:
        """Every group with its start time: the rings, then each rank's packs in order."""
        out = list(self.rings)
        for r in range(self.world_size):
            t = float(self.base_s[r])
            at = cost.at_speed(self.speed(r))
            for pack in self.packs_of(r):
                dur = _pack_time(pack, at)
                out.append(Task(ranks=(r,), shards=tuple(pack), start_s=t, duration_s=dur))
                t += dur
        return out


def item_time(sh: Shard, cost: CostModel) -> float:
    """Time of a short sequence on one rank (no ring, so no communication)."""
    return cost.seq_time(sh.length, 1, bandwidth_gbps=1.0, offload_ratio=sh.offload_ratio)


def _pack_time(pack: Sequence[Shard], cost: CostModel) -> float:
    return cost.c + sum(item_time(sh, cost) for sh in pack)


def _short_load(items: Sequence[Shard], cost: CostModel, capacity_tokens: int) -> float:
    if not items:
        return 0.0
    packs = best_fit_packs(items, capacity_tokens=capacity_tokens)
    return sum(_pack_time(p, cost) for p in packs)


# -- pass 1: ring sizes -----------------------------------------------------------------
def _ring_time(sh: Shard, d: int, cost: CostModel, topo: Topology) -> float:
    """Time of `sh` on a ring of d ranks placed as the scheduler places it."""
    return cost.seq_time(sh.length, d, bandwidth_gbps=topo.bandwidth_for_size(d),
                         offload_ratio=sh.offload_ratio)


class _Region(NamedTuple):
    """Ring sizes of one bandwidth: inside one node, or across nodes."""

    smallest: int
    largest: int
    bandwidth_gbps: float


def _ring_regions(sh: Shard, topo: Topology) -> list[_Region]:
    """The ring sizes >= D(s) inside one node, then across nodes (empty regions left out)."""
    gpn, N = topo.gpus_per_node, topo.world_size
    out = []
    for lo, hi in ((sh.ring_size, min(gpn, N)), (max(sh.ring_size, gpn + 1), N)):
        if lo <= hi:
            out.append(_Region(smallest=lo, largest=hi, bandwidth_gbps=topo.bandwidth_for_size(lo)))
    return out


def _fastest_ring(length: int, lo: int, hi: int, bandwidth_gbps: float, cost: CostModel) -> int:
    """The ring size in [lo, hi] with the least compute + exposed communication.

    With u = 1/d that time is (A + B) u plus, per direction, max(0, (1 - u)(K - k E u)): a
    sum of convex functions of u (scheduler/cost.py), so it is unimodal in d and an
    integer ternary search finds the minimum (ties to the smaller ring).
    """
    def time(d: int) -> tuple[float, int]:
        return cost.seq_time(length, d, bandwidth_gbps=bandwidth_gbps), d

    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if time(m1) <= time(m2):
            hi = m2
        else:
            lo = m1
    return min(range(lo, hi + 1), key=time)


def _hidden_ring_sizes(sh: Shard, cost: CostModel, topo: Topology) -> list[Sequence[int]]:
    """Per bandwidth region, the sizes from D(s) up to where ring communication stops
    hiding behind attention (never past the fastest size)."""
    out = []
    for lo, hi, bw in _ring_regions(sh, topo):
        top = min(_fastest_ring(sh.length, lo, hi, bw, cost),
                  cost.max_hidden_ring(sh.length, bandwidth_gbps=bw))
        if top >= lo:
            span = _allowed(range(lo, top + 1), hi, topo)
            if span:
                out.append(span)
    return out


def _useful_ring_sizes(sh: Shard, cost: CostModel, topo: Topology) -> list[Sequence[int]]:
    """Per bandwidth region, the sizes from D(s) up to the fastest: enlarging a ring pays
    while its KV hand-off hides behind attention and a little beyond, until the exposed
    communication grows faster than the compute shrinks. T(s, d) decreases along each."""
    return [_allowed(range(lo, _fastest_ring(sh.length, lo, hi, bw, cost) + 1), hi, topo,
                     beyond=True) for lo, hi, bw in _ring_regions(sh, topo)]


def _allowed(span: range, hi: int, topo: Topology, *, beyond: bool = False) -> Sequence[int]:
    """The sizes of `span` the topology allows: all, or its powers of two, plus the first
    power of two above it (up to `hi`) when the span holds none or, with `beyond`, because
    the fastest size may lie between two powers of two."""
    if not topo.pow2_rings:
        return span
    sizes = [1 << k for k in range(span[0].bit_length() - 1, span[-1].bit_length() + 1)
             if span[0] <= 1 << k <= span[-1]]
    if beyond or not sizes:
        up = topo.allowed_at_least(span[-1] + 1 if sizes else span[0])
        if up is not None and up <= hi:
            sizes.append(up)
    return sizes


def resize(sh: Shard, d: int, capacity_tokens: int, cost: CostModel) -> Shard:
    """`sh` on a ring of d >= D(s) ranks: the offload it still needs there (never more)."""
    if d == sh.ring_size:
        return sh
    if sh.offload_ratio == 0.0:
        return Shard(seq_id=sh.seq_id, length=sh.length, ring_size=d, offload_ratio=0.0)
    need = shard_sequence(sh.seq_id, sh.length, capacity_tokens=capacity_tokens,
                          world_size=d, cost=cost, offload="needed")
    return Shard(seq_id=sh.seq_id, length=sh.length, ring_size=d,
                 offload_ratio=min(need.offload_ratio, sh.offload_ratio))


def _choose_ring_size(sh: Shard, target_s: float, cost: CostModel, topo: Topology, *,
                      level_s: float = 0.0, beyond_hidden: bool = True) -> int:
    """Ring size for `sh` against the balance target.

    A ring beyond the hiding limit is faster but spends d T(s, d) - compute(s) rank-seconds
    on exposed communication, which lifts every rank's level by that / N. With
    f(d) = max(T(s, d), level + waste(d) / N): the smallest useful size whose T(s, d) meets
    the target if f does too (T decreases along each region's useful sizes: binary
    search, inside a node first), else the size on a grid that minimises f. With
    `beyond_hidden` False the sizes stop at the hiding limit.
    """
    N = topo.world_size
    base = cost.c + cost.compute_s(sh.length)

    def time(d: int) -> float:
        return cost.c + _ring_time(sh, d, cost, topo)

    def f(d: int) -> float:
        t = time(d)
        return max(t, level_s + max(0.0, d * t - base) / N)

    if time(sh.ring_size) <= target_s:
        return sh.ring_size
    spans = (_useful_ring_sizes if beyond_hidden else _hidden_ring_sizes)(sh, cost, topo)
    for span in spans:
        if time(span[-1]) > target_s:
            continue
        lo, hi = 0, len(span) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if time(span[mid]) <= target_s:
                hi = mid
            else:
                lo = mid + 1
        if f(span[lo]) <= target_s:
            return span[lo]
        break
    grid = {sh.ring_size}
    for span in spans:
        lo, hi = span[0], span[-1]
        grid.update(round(lo * (hi / lo) ** (k / 15)) for k in range(16))
    grid.update(span[-1] for span in _hidden_ring_sizes(sh, cost, topo))
    return min(_snap(grid, topo), key=lambda d: (f(d), d))


def _snap(sizes, topo: Topology) -> set[int]:
    """Each size, or the smallest allowed size above it (pow2 rings)."""
    if not topo.pow2_rings:
        return set(sizes)
    return {d for d in (topo.allowed_at_least(x) for x in sizes) if d is not None}


def best_ring_time(sh: Shard, cost: CostModel, topo: Topology, capacity_tokens: int) -> float:
    """A lower bound on one sequence's group time over every ring size d >= D(s): c plus
    the fastest compute + exposed communication of any region (`_fastest_ring`), plus the
    smallest possible memory-scheme overhead (recompute and exposed copies at d =
    world_size, where a rank holds the fewest tokens)."""
    s, N = sh.length, topo.world_size
    best = min(cost.seq_time(s, _fastest_ring(s, lo, hi, bw, cost), bandwidth_gbps=bw)
               for lo, hi, bw in _ring_regions(sh, topo))
    least = resize(sh, N, capacity_tokens, cost)
    at_n = cost.seq_cost(s, N, bandwidth_gbps=topo.bandwidth_for_size(N),
                         offload_ratio=least.offload_ratio)
    return cost.c + best + at_n.recompute_s + at_n.exposed_offload_s


def _balance_target(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                    capacity_tokens: int, speeds: np.ndarray | None = None) -> float:
    """Perfect-balance bound: total compute / summed rank speed, and the longest sequence's
    best ring at the fastest speed (T(s, d) grows with s for every d, so the longest
    sequence has the slowest best ring)."""
    total_speed, fastest = _speed_totals(speeds, topo.world_size)
    work = sum(cost.compute_s(sh.length) for sh in shards) / total_speed
    longest = max(shards, key=lambda sh: (sh.length, -sh.ring_size, sh.seq_id))
    return max(work, best_ring_time(longest, cost.at_speed(fastest), topo, capacity_tokens))


def _speed_totals(speeds: np.ndarray | None, world_size: int) -> tuple[float, float]:
    """(summed speed, fastest speed) of the ranks (all 1 without speeds)."""
    if speeds is None:
        return float(world_size), 1.0
    return float(speeds.sum()), float(speeds.max())


# -- passes 2 and 3 ---------------------------------------------------------------------
class _FreeView:
    """When each rank frees up, sorted per node, to find where a ring of d ranks can start.

    A ring of d <= gpus_per_node ranks goes inside one node; a larger one takes the
    k = d // gpus_per_node nodes that free up first plus the rem = d % gpus_per_node
    earliest ranks of one more node: the fewest nodes that can hold it.
    """

    def __init__(self, free: np.ndarray, topo: Topology):
        self.gpus_per_node = topo.gpus_per_node
        self.topo = topo
        # [node, rank in node]; a view: updates write through to `free`
        self.free_by_node = free.reshape(-1, self.gpus_per_node)
        self.sort_order = np.argsort(self.free_by_node, axis=1, kind="stable")
        self.sorted_free = np.take_along_axis(self.free_by_node, self.sort_order, axis=1)
        self.node_free_sum = self.free_by_node.sum(axis=1)
        self._nodes: np.ndarray | None = None

    @property
    def nodes(self) -> np.ndarray:
        """Node ids by (when the whole node is free, total busy time): sorted on demand."""
        if self._nodes is None:
            self._nodes = np.lexsort((self.node_free_sum, self.sorted_free[:, -1]))
        return self._nodes

    def occupy(self, ranks: Sequence[int], until_s: float) -> None:
        """Mark `ranks` busy until `until_s`, re-sorting only the nodes they sit on."""
        flat = self.free_by_node.reshape(-1)
        flat[list(ranks)] = until_s
        touched = sorted({r // self.gpus_per_node for r in ranks})
        rows = self.free_by_node[touched]
        self.sort_order[touched] = np.argsort(rows, axis=1, kind="stable")
        self.sorted_free[touched] = np.take_along_axis(rows, self.sort_order[touched], axis=1)
        self.node_free_sum[touched] = rows.sum(axis=1)
        self._nodes = None

    def start(self, d: int) -> float:
        """Earliest time d ranks placed this way are all free."""
        if d <= self.gpus_per_node:
            return float(self.sorted_free[:, d - 1].min())
        k, rem = divmod(d, self.gpus_per_node)
        start = float(self.sorted_free[self.nodes[k - 1], -1])
        if rem:
            start = max(start, float(self.sorted_free[self.nodes[k:], rem - 1].min()))
        return start

    def ranks(self, d: int) -> list[int]:
        """The ranks `start(d)` refers to, in ring order (least idle on ties)."""
        gpn, S = self.gpus_per_node, self.sorted_free
        if d <= gpn:
            col = S[:, d - 1]
            tied = np.flatnonzero(col <= col.min())
            idle = d * col[tied] - S[tied, :d].sum(axis=1)
            node = int(tied[np.argmin(idle)])
            return sorted(node * gpn + int(j) for j in self.sort_order[node, :d])
        k, rem = divmod(d, gpn)
        full = self.nodes[:k]
        chosen = [int(n) * gpn + j for n in full for j in range(gpn)]
        if rem:
            rest = self.nodes[k:]
            node = int(rest[np.argmin(S[rest, rem - 1])])
            chosen += [node * gpn + int(j) for j in self.sort_order[node, :rem]]
        return self.topo.ring_order(chosen)

    def free_counts(self, levels: int = 8) -> list[int]:
        """How many ranks are free by each of the first few node-level free times."""
        times = np.unique(self.sorted_free[self.nodes[:levels], -1])
        return [int(np.count_nonzero(self.sorted_free <= t)) for t in times if np.isfinite(t)]


def _candidate_sizes(sh: Shard, d0: int, view: _FreeView, cost: CostModel,
                     topo: Topology) -> list[int]:
    """Ring sizes worth trying for `sh`: D(s), the target's size d0 (which may lie beyond
    the hiding limit when only such a ring meets the target), the hiding limits, a
    geometric grid between, and the numbers of ranks that free up first. Other sizes
    beyond the hiding limit would spend rank time on exposed communication."""
    spans = _hidden_ring_sizes(sh, cost, topo)
    cand = {sh.ring_size, d0}
    counts = view.free_counts() if spans and spans[-1][-1] > topo.gpus_per_node else []
    for span in spans:
        cand.update((span[0], span[-1]))
        lo, hi = span[0], span[-1]
        cand.update(round(lo * (hi / lo) ** (k / 7)) for k in range(1, 7))
        cand.update(c for c in counts if span[0] <= c <= span[-1])
    return sorted(_snap(cand, topo))


class _SpeedClass(NamedTuple):
    """The ranks at least `speed` fast, as a _FreeView (the slower ones never free)."""

    speed: float
    view: _FreeView


class _SpeedViews:
    """One _FreeView per speed class: the class's view hides every slower rank (free at
    infinity), so a ring placed through it runs at least that fast. One view over `free`
    itself when every rank has the same speed."""

    def __init__(self, free: np.ndarray, speeds: np.ndarray | None, topo: Topology):
        self.free = free
        self.speeds = speeds
        levels = [1.0] if speeds is None else sorted(set(speeds.tolist()), reverse=True)
        if speeds is None or len(levels) == 1:
            self.classes = [_SpeedClass(levels[0], _FreeView(free, topo))]
        else:  # fastest first
            self.classes = [_SpeedClass(v, _FreeView(np.where(speeds >= v, free, np.inf), topo))
                            for v in levels]

    def occupy(self, ranks: Sequence[int], until_s: float) -> None:
        if len(self.classes) == 1:
            self.classes[0].view.occupy(ranks, until_s)
            return
        assert self.speeds is not None, "several speed classes come from per-rank speeds"
        self.free[list(ranks)] = until_s
        for v, view in self.classes:
            visible = [r for r in ranks if self.speeds[r] >= v]
            if visible:
                view.occupy(visible, until_s)

    def ring_speed(self, ranks: Sequence[int]) -> float:
        return 1.0 if self.speeds is None else float(self.speeds[list(ranks)].min())


class _SizedRing(NamedTuple):
    """Pass 1's answer for one sequence: its shard at D(s) and its ring size for the target."""

    shard: Shard
    ring_size: int


class _RingOption(NamedTuple):
    """One place pass 2 could put a ring."""

    end_s: float  # when the ring would end
    ring_size: int
    speed_class: int  # index into _SpeedViews.classes (0: the fastest)
    shard: Shard  # the sequence resized to `ring_size` (its offload there)


def _place_rings(rings: Sequence[_SizedRing], free: np.ndarray, cost: CostModel,
                 topo: Topology, capacity_tokens: int, target_s: float,
                 speeds: np.ndarray | None = None) -> list[Task]:
    """Alg. 2 for the rings, each sized to the target by pass 1 (d0): largest work first,
    each onto the smallest ring that still ends by the target (leaving the most ranks to
    the rest; the fastest class on ties), or, if none can, the size, speed class and ranks
    that end it earliest."""
    def largest_work_first(ring: _SizedRing) -> tuple[float, float, int]:
        t = _ring_time(ring.shard, ring.ring_size, cost, topo)
        return -t * ring.ring_size, -t, ring.shard.seq_id

    tasks = []
    views = _SpeedViews(free, speeds, topo)
    for sh, d0 in sorted(rings, key=largest_work_first):
        choice = _ring_choice(sh, d0, views, cost, topo, capacity_tokens, target_s)
        d = choice.ring_size
        ranks = views.classes[choice.speed_class].view.ranks(d)
        start = float(free[ranks].max())
        at = cost.at_speed(views.ring_speed(ranks))
        dur = at.c + at.seq_time(sh.length, d, bandwidth_gbps=topo.ring_bandwidth(ranks),
                                 offload_ratio=choice.shard.offload_ratio)
        views.occupy(ranks, start + dur)
        tasks.append(Task(ranks=tuple(ranks), shards=(choice.shard,), start_s=start,
                          duration_s=dur))
    return tasks


def _ring_choice(sh: Shard, d0: int, views: _SpeedViews, cost: CostModel, topo: Topology,
                 capacity_tokens: int, target_s: float) -> _RingOption:
    """Where `sh` goes: the smallest ring (then the fastest class) that ends by the target,
    else the option that ends first."""
    options = []
    for level, (v, view) in enumerate(views.classes):
        at = cost.at_speed(v)
        for d in _candidate_sizes(sh, d0, view, cost, topo):
            x = resize(sh, d, capacity_tokens, cost)
            end = view.start(d) + at.c + _ring_time(x, d, at, topo)
            if math.isfinite(end):  # a class with fewer than d ranks cannot hold the ring
                options.append(_RingOption(end_s=end, ring_size=d, speed_class=level, shard=x))
    under = [o for o in options if o.end_s <= target_s * (1 + 1e-9)]
    if under:
        return min(under, key=lambda o: (o.ring_size, o.speed_class))
    return min(options, key=lambda o: (o.end_s, o.ring_size, o.speed_class))


def _place_shorts(shorts: Sequence[Shard], start: np.ndarray, items: list[list[Shard]],
                  cost: CostModel, capacity_tokens: int, speeds: np.ndarray | None = None,
                  capacities: np.ndarray | None = None) -> list[list[Shard]]:
    """LPT: longest first onto the rank where it finishes earliest (the least-loaded one
    when all run at one speed), opening a pack when one is full.

    `start` is when each rank's fixed groups end; `items` already holds movable sequences
    per rank (their time counts as one open pack) and is extended in place. One heap per
    speed class: the least-loaded rank of each class is the only one of it worth asking.
    """
    n = start.size
    caps = np.full(n, capacity_tokens, dtype=np.int64) if capacities is None else capacities
    v = np.ones(n) if speeds is None else speeds
    room = np.zeros(n, dtype=np.int64)  # free tokens in each rank's open pack
    heaps: dict[float, list[tuple[float, int]]] = {x: [] for x in set(v.tolist())}
    for r, t in enumerate(start.tolist()):
        if items[r]:
            t += _short_load(items[r], cost.at_speed(float(v[r])), int(caps[r]))
            room[r] = max(0, int(caps[r]) - sum(held_tokens(sh) for sh in items[r]))
        heaps[float(v[r])].append((t, r))
    for heap in heaps.values():
        heapq.heapify(heap)
    classes = sorted(heaps, reverse=True)
    ordered = sorted(shorts, key=lambda x: (-x.length, x.seq_id))
    times = cost.single_rank_times([sh.length for sh in ordered],
                                   [sh.offload_ratio for sh in ordered]).tolist()
    for sh, t in zip(ordered, times, strict=True):
        need = held_tokens(sh)
        finish, speed, r = math.inf, classes[0], -1  # the earliest finish over the classes
        for cls in classes:
            load, rank = heaps[cls][0]
            end = load + (t + (cost.c if room[rank] < need else 0.0)) / cls
            if r < 0 or end < finish:
                finish, speed, r = end, cls, rank
        heapq.heappop(heaps[speed])
        if room[r] < need:
            room[r] = caps[r]
        room[r] -= need
        items[r].append(sh)
        heapq.heappush(heaps[speed], (finish, r))
    return items


class _Movable(NamedTuple):
    """Pass 2's tasks split into what stays where it is and what pass 3 / the LNS may move."""

    fixed: list[Task]
    fixed_end_s: np.ndarray  # float64[world_size]: when each rank's fixed tasks end
    items: list[list[Shard]]  # movable sequences per rank


def _split_movable(tasks: Sequence[Task], world_size: int) -> _Movable:
    """Single-rank tasks after a rank's last ring become movable items of that rank, so
    the LNS can still move sequences that pass 2 placed alone."""
    last_ring = np.zeros(world_size)
    for t in tasks:
        if len(t.ranks) > 1:
            last_ring[list(t.ranks)] = np.maximum(last_ring[list(t.ranks)], t.end_s)
    fixed: list[Task] = []
    items: list[list[Shard]] = [[] for _ in range(world_size)]
    base = np.zeros(world_size)
    for t in tasks:
        r = t.ranks[0]
        if len(t.ranks) == 1 and t.start_s >= last_ring[r]:
            items[r].extend(t.shards)
        else:
            fixed.append(t)
            base[list(t.ranks)] = np.maximum(base[list(t.ranks)], t.end_s)
    return _Movable(fixed=fixed, fixed_end_s=base, items=items)


def pack_fixed_singles(tasks: Sequence[Task], cost: CostModel, capacity_tokens: int,
                       speeds: np.ndarray | None = None,
                       capacities: np.ndarray | None = None) -> list[Task]:
    """Single-rank tasks a rank runs back to back before one of its rings, packed
    (best-fit decreasing) into as few micro-batches as fit: the same order around the
    rings, fewer fixed costs c. The ring keeps its start time (a bound; the simulator
    times the plan from the order alone)."""
    by_rank: dict[int, list[Task]] = {}
    out = []
    for t in sorted(tasks, key=lambda t: (t.start_s, t.ranks)):
        if len(t.ranks) == 1:
            by_rank.setdefault(t.ranks[0], []).append(t)
            continue
        for r in t.ranks:
            out += _packed_run(by_rank.pop(r, []), cost, capacity_tokens, speeds, capacities)
        out.append(t)
    for run in by_rank.values():
        out += _packed_run(run, cost, capacity_tokens, speeds, capacities)
    return out


def _packed_run(run: list[Task], cost: CostModel, capacity_tokens: int,
                speeds: np.ndarray | None, capacities: np.ndarray | None) -> list[Task]:
    if len(run) < 2:
        return run
    r = run[0].ranks[0]
    cap = capacity_tokens if capacities is None else int(capacities[r])
    at = cost.at_speed(1.0 if speeds is None else float(speeds[r]))
    t, out = run[0].start_s, []
    for pack in best_fit_packs([sh for task in run for sh in task.shards], capacity_tokens=cap):
        dur = _pack_time(pack, at)
        out.append(Task(ranks=(r,), shards=tuple(pack), start_s=t, duration_s=dur))
        t += dur
    return out


def held_tokens(sh: Shard) -> int:
    return int(np.ceil(sh.length * (1.0 - sh.offload_ratio) - 1e-9))


def _size_rings(shards: Sequence[Shard], single: np.ndarray, target: float, cost: CostModel,
                topo: Topology, *, beyond_hidden: bool,
                total_speed: float | None = None) -> list[_SizedRing]:
    """Pass 1: each sequence's ring size for the target, longest first, the level rising
    with the exposed communication of every ring enlarged past its hiding limit
    (`total_speed`: the ranks' summed speed, default one per rank)."""
    sized = [_SizedRing(shard=sh, ring_size=1) for sh in shards]
    level = sum(cost.compute_s(sh.length) for sh in shards) / (total_speed or topo.world_size)
    for k in sorted(range(len(shards)), key=lambda k: (-shards[k].length, k)):
        sh = shards[k]
        if sh.ring_size == 1 and single[k] <= target:
            continue
        d = _choose_ring_size(sh, target, cost, topo, level_s=level, beyond_hidden=beyond_hidden)
        t = cost.c + _ring_time(sh, d, cost, topo)
        level += max(0.0, d * t - cost.c - cost.compute_s(sh.length)) / topo.world_size
        sized[k] = _SizedRing(shard=sh, ring_size=d)
    return sized


class _Candidate(NamedTuple):
    """The schedule with the smallest makespan found so far."""

    makespan_s: float
    schedule: Schedule
    num_grouped: int  # sequences placed in pass 2 (rings and coarse short ones)


def greedy_schedule(shards: Sequence[Shard], *, cost: CostModel, topo: Topology,
                    capacity_tokens: int, speeds: np.ndarray | None = None,
                    capacities: np.ndarray | None = None) -> Schedule:
    """Passes 1-3: ring sizes against the balance target, rings, then short packs.

    Tried first with rings capped at their hiding limit, then (when the problem is small
    enough, `FASTEST_MODE_CAP`) with rings allowed up to their fastest size; passes 2 and
    3 with a few targets each (`PLACEMENT_TARGETS`). The schedule with the smallest
    makespan is kept; a mode stops early once a schedule reaches what it cannot beat.
    `speeds` and `capacities` (float64 / int64 per rank): see the module docstring; None
    is every rank at speed 1 with `capacity_tokens`.
    """
    speeds = _nonuniform(speeds)
    capacities = None if capacities is None or np.all(capacities == capacity_tokens) \
        else np.asarray(capacities, dtype=np.int64)
    target = _balance_target(shards, cost, topo, capacity_tokens, speeds)
    total_speed, fastest = _speed_totals(speeds, topo.world_size)
    single = cost.single_rank_times([sh.length for sh in shards],
                                    [sh.offload_ratio for sh in shards])
    longest = max(shards, key=lambda sh: (sh.length, -sh.ring_size, sh.seq_id))
    quickest = cost.at_speed(fastest)
    best: _Candidate | None = None
    for beyond_hidden in (False, True):
        if beyond_hidden:
            assert best is not None, "the first mode places at least once"
            if best.makespan_s <= target * (1 + 1e-6) \
                    or best.num_grouped * topo.world_size > FASTEST_MODE_CAP:
                break
        sized = _size_rings(shards, single, target, cost, topo, beyond_hidden=beyond_hidden,
                            total_speed=total_speed)
        # Rings, and short sequences too coarse to fill gaps late, are placed in pass 2.
        coarse = [d > 1 or t > GRAIN * target
                  for (_, d), t in zip(sized, single.tolist(), strict=True)]
        long = [x for x, big in zip(sized, coarse, strict=True) if big]
        shorts = [sh for (sh, _), big in zip(sized, coarse, strict=True) if not big]
        reachable = max(target, _mode_floor(longest, quickest, cost, topo, capacity_tokens,
                                            beyond_hidden=beyond_hidden))
        for factor in PLACEMENT_TARGETS if long else (1.0,):
            schedule = _place_all(long, shorts, cost, topo, capacity_tokens, target * factor,
                                  speeds=speeds, capacities=capacities)
            makespan = float(schedule.loads(cost).max())
            if best is None or makespan < best.makespan_s * (1 - 1e-9):
                best = _Candidate(makespan_s=makespan, schedule=schedule, num_grouped=len(long))
            if makespan <= reachable * (1 + 1e-6):
                break  # nothing in this mode can beat it
    assert best is not None, "every mode places at least once"
    return best.schedule


def _mode_floor(longest: Shard, quickest: CostModel, cost: CostModel, topo: Topology,
                capacity_tokens: int, *, beyond_hidden: bool) -> float:
    """The longest sequence on its largest ring of this mode at the fastest speed: no
    schedule of the mode ends before that."""
    spans = (_useful_ring_sizes if beyond_hidden else _hidden_ring_sizes)(longest, cost, topo)
    ends = [span[-1] for span in spans] or [longest.ring_size]
    return quickest.c + min(
        _ring_time(resize(longest, d, capacity_tokens, cost), d, quickest, topo) for d in ends)


def _place_all(long: Sequence[_SizedRing], shorts: Sequence[Shard], cost: CostModel,
               topo: Topology, capacity_tokens: int, target_s: float, *,
               speeds: np.ndarray | None = None,
               capacities: np.ndarray | None = None) -> Schedule:
    """Passes 2 and 3 for one target."""
    free = np.zeros(topo.world_size, dtype=np.float64)
    rings = _place_rings(long, free, cost, topo, capacity_tokens, target_s, speeds)
    fixed, base, items = _split_movable(rings, topo.world_size)
    fixed = pack_fixed_singles(fixed, cost, capacity_tokens, speeds, capacities)
    items = _place_shorts(shorts, base, items, cost, capacity_tokens, speeds, capacities)
    return Schedule(world_size=topo.world_size, capacity_tokens=capacity_tokens, rings=fixed,
                    base_s=base, items=items, speeds=speeds, capacities=capacities)


def _nonuniform(speeds) -> np.ndarray | None:
    """float64 speeds, or None when every rank runs at speed 1 (the uniform scheduler)."""
    if speeds is None:
        return None
    v = np.asarray(speeds, dtype=np.float64)
    return None if np.all(v == 1.0) else v
