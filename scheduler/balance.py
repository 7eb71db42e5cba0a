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
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scheduler.cost import CostModel
from scheduler.sharding import Shard, best_fit_packs, shard_sequence
from scheduler.topology import Topology

# Pass 2 targets, as multiples of the balance bound; 0 means "finish each ring earliest".
PLACEMENT_TARGETS = (1.0, 1.05, 0.0)
# A short sequence longer than this share of the target is placed with the rings (pass 2),
# where it may get a ring of its own to fill a gap, rather than by LPT at the end.
GRAIN = 0.05


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
    capacity_tokens: int
    rings: list[Task]  # multi-rank (or enlarged) groups, each at its start time
    base_s: np.ndarray  # float64[world_size]: when each rank's ring phase ends
    items: list[list[Shard]] = field(default_factory=list)  # short sequences per rank

    def packs_of(self, rank: int) -> list[list[Shard]]:
        return best_fit_packs(self.items[rank], capacity_tokens=self.capacity_tokens)

    def rank_load(self, rank: int, cost: CostModel) -> float:
        return self.base_s[rank] + short_load(self.items[rank], cost, self.capacity_tokens)

    def loads(self, cost: CostModel) -> np.ndarray:
        return np.array([self.rank_load(r, cost) for r in range(self.world_size)])

    def tasks(self, cost: CostModel) -> list[Task]:
        """Every group with its start time: the rings, then each rank's packs in order."""
        out = list(self.rings)
        for r in range(self.world_size):
            t = float(self.base_s[r])
            for pack in self.packs_of(r):
                dur = pack_time(pack, cost)
                out.append(Task(ranks=(r,), shards=tuple(pack), start_s=t, duration_s=dur))
                t += dur
        return out


def item_time(sh: Shard, cost: CostModel) -> float:
    """Time of a short sequence on one rank (no ring, so no communication)."""
    return cost.seq_time(sh.length, 1, bandwidth_gbps=1.0, offload_ratio=sh.offload_ratio)


def pack_time(pack: Sequence[Shard], cost: CostModel) -> float:
    return cost.c + sum(item_time(sh, cost) for sh in pack)


def short_load(items: Sequence[Shard], cost: CostModel, capacity_tokens: int) -> float:
    if not items:
        return 0.0
    packs = best_fit_packs(items, capacity_tokens=capacity_tokens)
    return sum(pack_time(p, cost) for p in packs)


# -- pass 1: ring sizes -----------------------------------------------------------------
def ring_time(sh: Shard, d: int, cost: CostModel, topo: Topology) -> float:
    """Time of `sh` on a ring of d ranks placed as the scheduler places it."""
    return cost.seq_time(sh.length, d, bandwidth_gbps=topo.bandwidth_for_size(d),
                         offload_ratio=sh.offload_ratio)


def hidden_ring_sizes(sh: Shard, cost: CostModel, topo: Topology) -> list[range]:
    """Ring sizes >= D(s) (ascending) at which ring communication hides behind compute."""
    gpn, N = topo.gpus_per_node, topo.world_size
    intra = cost.max_hidden_ring(sh.length, bandwidth_gbps=topo.bandwidth_for_size(1))
    inter = cost.max_hidden_ring(sh.length, bandwidth_gbps=topo.bandwidth_for_size(gpn + 1))
    spans = [range(sh.ring_size, min(gpn, intra, N) + 1),
             range(max(sh.ring_size, gpn + 1), min(inter, N) + 1)]
    return [s for s in spans if len(s)]


def resize(sh: Shard, d: int, capacity_tokens: int, cost: CostModel) -> Shard:
    """`sh` on a ring of d >= D(s) ranks: the offload it still needs there (never more)."""
    if d == sh.ring_size:
        return sh
    need = shard_sequence(sh.seq_id, sh.length, capacity_tokens=capacity_tokens,
                          world_size=d, cost=cost, offload="needed")
    return Shard(seq_id=sh.seq_id, length=sh.length, ring_size=d,
                 offload_ratio=min(need.offload_ratio, sh.offload_ratio))


def choose_ring_size(sh: Shard, target_s: float, cost: CostModel, topo: Topology) -> int:
    """Smallest hidden ring size with T(s, d) <= target, else the fastest hidden one.

    Over the hidden sizes T(s, d) = compute / d (+ offload that shrinks with d) is
    decreasing, so a binary search over the concatenated spans finds it.
    """
    if ring_time(sh, sh.ring_size, cost, topo) <= target_s:
        return sh.ring_size
    spans = hidden_ring_sizes(sh, cost, topo)
    flat_len = sum(len(s) for s in spans)
    if not flat_len:
        return sh.ring_size

    def at(i: int) -> int:
        for s in spans:
            if i < len(s):
                return s[i]
            i -= len(s)
        raise IndexError(i)

    lo, hi = 0, flat_len - 1
    if ring_time(sh, at(hi), cost, topo) > target_s:
        return at(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if ring_time(sh, at(mid), cost, topo) <= target_s:
            hi = mid
        else:
            lo = mid + 1
    return at(lo)


def best_ring_time(sh: Shard, cost: CostModel, topo: Topology, capacity_tokens: int) -> float:
    """A lower bound on one sequence's group time over every ring size d >= D(s).

    Per bandwidth region (inside a node: d <= gpus_per_node; across nodes: above) the
    compute-plus-exposed-communication time is max((A+B)/d, K + (B-K)/d + A/d^2) with
    A = a s^2, B = b s, K the whole sequence's ring traffic time: convex in 1/d, so the
    integer minimum sits next to the hiding limit, next to the convex piece's minimum
    d* = 2A/(K-B), or at a region end. Offload can only add time; its smallest possible
    exposure (at d = world_size, the least offload needed) is added.
    """
    s, N, gpn = sh.length, topo.world_size, topo.gpus_per_node
    best = np.inf
    for lo, hi in ((sh.ring_size, min(gpn, N)), (max(sh.ring_size, gpn + 1), N)):
        if lo > hi:
            continue
        bw = topo.bandwidth_for_size(lo)
        cand = {lo, hi}
        d_hide = cost.max_hidden_ring(s, bandwidth_gbps=bw)
        cand |= {d_hide, d_hide + 1}
        K, A, B = cost.ring_bytes_per_token * s / (bw * 1e9), cost.a * s * s, cost.b * s
        if K > B and A > 0:
            d_star = 2 * A / (K - B)
            cand |= {int(np.floor(min(d_star, N))), int(np.ceil(min(d_star, N)))}
        for d in {min(hi, max(lo, d)) for d in cand}:
            best = min(best, cost.seq_time(s, d, bandwidth_gbps=bw))
    least = resize(sh, N, capacity_tokens, cost)
    offload = cost.seq_cost(s, N, bandwidth_gbps=topo.bandwidth_for_size(N),
                            offload_ratio=least.offload_ratio).exposed_offload_s
    return cost.c + best + offload


def balance_target(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                   capacity_tokens: int) -> float:
    """Perfect-balance bound: total compute / ranks, and the longest sequence's best ring
    (T(s, d) grows with s for every d, so the longest sequence has the slowest best ring)."""
    work = sum(cost.compute_s(sh.length) for sh in shards) / topo.world_size
    longest = max(shards, key=lambda sh: (sh.length, -sh.ring_size, sh.seq_id))
    return max(work, best_ring_time(longest, cost, topo, capacity_tokens))


# -- passes 2 and 3 ---------------------------------------------------------------------
class FreeView:
    """When each rank frees up, sorted per node, to find where a ring of d ranks can start.

    A ring of d <= gpus_per_node ranks goes inside one node; a larger one takes the
    k = d // gpus_per_node nodes that free up first plus the rem = d % gpus_per_node
    earliest ranks of one more node: the fewest nodes that can hold it.
    """

    def __init__(self, free: np.ndarray, topo: Topology):
        self.gpn = topo.gpus_per_node
        self.topo = topo
        self.F = free.reshape(-1, self.gpn)  # a view: updates write through to `free`
        self.order = np.argsort(self.F, axis=1, kind="stable")
        self.S = np.take_along_axis(self.F, self.order, axis=1)
        self.node_sum = self.F.sum(axis=1)
        self._nodes: np.ndarray | None = None

    @property
    def nodes(self) -> np.ndarray:
        """Node ids by (when the whole node is free, total busy time): sorted on demand."""
        if self._nodes is None:
            self._nodes = np.lexsort((self.node_sum, self.S[:, -1]))
        return self._nodes

    def occupy(self, ranks: Sequence[int], until_s: float) -> None:
        """Mark `ranks` busy until `until_s`, re-sorting only the nodes they sit on."""
        flat = self.F.reshape(-1)
        flat[list(ranks)] = until_s
        touched = sorted({r // self.gpn for r in ranks})
        rows = self.F[touched]
        self.order[touched] = np.argsort(rows, axis=1, kind="stable")
        self.S[touched] = np.take_along_axis(rows, self.order[touched], axis=1)
        self.node_sum[touched] = rows.sum(axis=1)
        self._nodes = None

    def start(self, d: int) -> float:
        """Earliest time d ranks placed this way are all free."""
        if d <= self.gpn:
            return float(self.S[:, d - 1].min())
        k, rem = divmod(d, self.gpn)
        start = float(self.S[self.nodes[k - 1], -1])
        if rem:
            start = max(start, float(self.S[self.nodes[k:], rem - 1].min()))
        return start

    def ranks(self, d: int) -> list[int]:
        """The ranks `start(d)` refers to, in ring order (least idle on ties)."""
        gpn, S = self.gpn, self.S
        if d <= gpn:
            col = S[:, d - 1]
            tied = np.flatnonzero(col <= col.min())
            idle = d * col[tied] - S[tied, :d].sum(axis=1)
            node = int(tied[np.argmin(idle)])
            return sorted(node * gpn + int(j) for j in self.order[node, :d])
        k, rem = divmod(d, gpn)
        full = self.nodes[:k]
        chosen = [int(n) * gpn + j for n in full for j in range(gpn)]
        if rem:
            rest = self.nodes[k:]
            node = int(rest[np.argmin(S[rest, rem - 1])])
            chosen += [node * gpn + int(j) for j in self.order[node, :rem]]
        return self.topo.ring_order(chosen)

    def free_counts(self, levels: int = 8) -> list[int]:
        """How many ranks are free by each of the first few node-level free times."""
        times = np.unique(self.S[self.nodes[:levels], -1])
        return [int(np.count_nonzero(self.S <= t)) for t in times]


def candidate_sizes(sh: Shard, d0: int, view: FreeView, cost: CostModel,
                    topo: Topology) -> list[int]:
    """Ring sizes worth trying for `sh`: D(s), the target's size d0, the hidden limits, a
    geometric grid between, and the numbers of ranks that free up first."""
    spans = hidden_ring_sizes(sh, cost, topo)
    cand = {sh.ring_size, d0}
    counts = view.free_counts() if spans and spans[-1][-1] > topo.gpus_per_node else []
    for span in spans:
        cand.update((span[0], span[-1]))
        lo, hi = span[0], span[-1]
        cand.update(round(lo * (hi / lo) ** (k / 7)) for k in range(1, 7))
        cand.update(c for c in counts if span[0] <= c <= span[-1])
    return sorted(cand)


def place_rings(rings: Sequence[Shard], free: np.ndarray, cost: CostModel, topo: Topology,
                capacity_tokens: int, target_s: float) -> list[Task]:
    """Alg. 2 for the rings: largest work first, each onto the smallest ring that still
    ends by the balance target (leaving the most ranks to the rest), or, if none can, the
    ring size and ranks that finish it earliest."""
    timed = sorted(((ring_time(sh, sh.ring_size, cost, topo), sh) for sh in rings),
                   key=lambda t: (-t[0] * t[1].ring_size, -t[0], t[1].seq_id))
    tasks = []
    view = FreeView(free, topo)
    for _, sh in timed:
        ends = [(view.start(d) + ring_time(sh, d, cost, topo), d)
                for d in candidate_sizes(sh, sh.ring_size, view, cost, topo)]
        under = [d for end, d in ends if end <= target_s * (1 + 1e-9)]
        d = min(under) if under else min(ends)[1]
        sized = resize(sh, d, capacity_tokens, cost) if d != sh.ring_size else sh
        ranks = view.ranks(d)
        start = float(free[ranks].max())
        bw = topo.ring_bandwidth(ranks)
        dur = cost.c + cost.seq_time(sized.length, d, bandwidth_gbps=bw,
                                     offload_ratio=sized.offload_ratio)
        view.occupy(ranks, start + dur)
        tasks.append(Task(ranks=tuple(ranks), shards=(sized,), start_s=start, duration_s=dur))
    return tasks


def place_shorts(shorts: Sequence[Shard], start: np.ndarray, items: list[list[Shard]],
                 cost: CostModel, capacity_tokens: int) -> list[list[Shard]]:
    """LPT: longest first onto the least-loaded rank, opening a pack when one is full.

    `start` is when each rank's fixed groups end; `items` already holds movable sequences
    per rank (their time counts as one open pack) and is extended in place.
    """
    room = np.zeros(start.size, dtype=np.int64)  # free tokens in each rank's open pack
    heap = []
    for r, t in enumerate(start.tolist()):
        if items[r]:
            t += short_load(items[r], cost, capacity_tokens)
            room[r] = max(0, capacity_tokens - sum(held_tokens(sh) for sh in items[r]))
        heap.append((t, r))
    heapq.heapify(heap)
    ordered = sorted(shorts, key=lambda x: (-x.length, x.seq_id))
    times = cost.single_rank_times([sh.length for sh in ordered],
                                   [sh.offload_ratio for sh in ordered]).tolist()
    for sh, t in zip(ordered, times, strict=True):
        load, r = heapq.heappop(heap)
        need = held_tokens(sh)
        extra = t
        if room[r] < need:
            room[r] = capacity_tokens
            extra += cost.c
        room[r] -= need
        items[r].append(sh)
        heapq.heappush(heap, (load + extra, r))
    return items


def split_movable(tasks: Sequence[Task], world_size: int
                  ) -> tuple[list[Task], np.ndarray, list[list[Shard]]]:
    """Single-rank tasks after a rank's last ring become movable items of that rank.

    Returns (fixed tasks, when each rank's fixed tasks end, movable items per rank), so
    the LNS can still move sequences that pass 2 placed alone.
    """
    last_ring = np.zeros(world_size)
    for t in tasks:
        if len(t.ranks) > 1:
            last_ring[list(t.ranks)] = np.maximum(last_ring[list(t.ranks)], t.end_s)
    fixed, items = [], [[] for _ in range(world_size)]
    base = np.zeros(world_size)
    for t in tasks:
        r = t.ranks[0]
        if len(t.ranks) == 1 and t.start_s >= last_ring[r]:
            items[r].extend(t.shards)
        else:
            fixed.append(t)
            base[list(t.ranks)] = np.maximum(base[list(t.ranks)], t.end_s)
    return fixed, base, items


def held_tokens(sh: Shard) -> int:
    return int(np.ceil(sh.length * (1.0 - sh.offload_ratio) - 1e-9))


def water_level(base: np.ndarray, work_s: float) -> float:
    """Finish time if `work_s` of perfectly divisible work filled the ranks from `base` up."""
    b = np.sort(base)
    fill = np.arange(1, b.size + 1) * b - np.cumsum(b)  # work to lift the k lowest to b[k-1]
    k = int(np.searchsorted(fill, work_s, side="right"))  # ranks below the level
    return float(max(b[-1], (work_s + b[:k].sum()) / k))


def greedy_schedule(shards: Sequence[Shard], *, cost: CostModel, topo: Topology,
                    capacity_tokens: int) -> Schedule:
    """Passes 1-3: ring sizes against the balance target, rings, then short packs.

    Pass 2 is tried with a few targets (the bound, 5% above it, and "finish each ring as
    early as possible"); the placement whose rings leave the lowest water level for the
    short sequences is kept, then pass 3 runs once.
    """
    target = balance_target(shards, cost, topo, capacity_tokens)
    single = cost.single_rank_times([sh.length for sh in shards],
                                    [sh.offload_ratio for sh in shards])
    sized = []
    for sh, t in zip(shards, single.tolist(), strict=True):
        d = choose_ring_size(sh, target, cost, topo) if sh.ring_size > 1 or t > target else 1
        sized.append(resize(sh, d, capacity_tokens, cost))
    # Rings, and short sequences too coarse to fill gaps late, are placed in pass 2.
    coarse = [sh.ring_size > 1 or t > GRAIN * target for sh, t in zip(sized, single.tolist(),
                                                                     strict=True)]
    long = [sh for sh, big in zip(sized, coarse, strict=True) if big]
    shorts = [sh for sh, big in zip(sized, coarse, strict=True) if not big]
    short_work = float(cost.single_rank_times([sh.length for sh in shorts],
                                              [sh.offload_ratio for sh in shorts]).sum())
    # The longest sequence on its largest hidden ring: no placement finishes before that.
    longest = max(shards, key=lambda sh: (sh.length, -sh.ring_size, sh.seq_id))
    spans = hidden_ring_sizes(longest, cost, topo)
    widest = spans[-1][-1] if spans else longest.ring_size
    reachable = max(target, cost.c + ring_time(resize(longest, widest, capacity_tokens, cost),
                                               widest, cost, topo))
    best = None
    for factor in PLACEMENT_TARGETS if long else (1.0,):
        free = np.zeros(topo.world_size, dtype=np.float64)
        rings = place_rings(long, free, cost, topo, capacity_tokens, target * factor)
        level = water_level(free, short_work)
        if best is None or level < best[0] * (1 - 1e-9):
            best = (level, rings, free)
        if level <= reachable * (1 + 1e-6):
            break  # nothing can beat the bound
    _, rings, _ = best
    fixed, base, items = split_movable(rings, topo.world_size)
    items = place_shorts(shorts, base, items, cost, capacity_tokens)
    return Schedule(world_size=topo.world_size, capacity_tokens=capacity_tokens, rings=fixed,
                    base_s=base, items=items)
