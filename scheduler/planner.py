"""`plan_batch`: one global batch of sequence lengths in, a StepPlan out.

Four policies on the same cost and memory model, so that their simulated makespans
compare fairly:

- "hdp": the ByteScale planner. Data-aware sharding (Alg. 1, Eq. 3; `scheduler.sharding`),
  the greedy balance scheduler (Alg. 2; `scheduler.balance`) improved by CP-SAT
  large-neighbourhood search under `time_limit_s` (`scheduler.lns`). Every pow2 plan is
  an hdp plan, so hdp also builds the pow2 plan (exactly as the "pow2" policy does) and
  keeps whichever simulates faster: free ring sizes can fragment nodes where whole-node
  power-of-two rings are better, and hdp is never slower than the pow2 baseline.
- "pow2": the same scheduler with ring sizes restricted to powers of two, the shape of
  Megatron-Core's dynamic context parallelism (CP groups of 1, 2, 4, 8, ... ranks chosen
  per batch).
- "naive": naive HDP, Alg. 1 without balancing: every sequence on its minimum ring D(s),
  short ones best-fit packed, groups laid into micro-batches in order (longest first) on
  consecutive ranks until a micro-batch is full.
- "static": the static mesh of Megatron/torchtitan at its best: one context-parallel
  degree p for everyone, floor(N / p) data-parallel replicas on consecutive ranks, each
  sequence on its replica's ring (LPT over replicas), packed per replica into
  micro-batches. Every degree from the smallest that fits the longest sequence up to N
  is considered (divisors of N or not) and the fastest kept; degrees whose lower bound
  (max(total time / replicas, the longest sequence's time)) cannot beat the best plan
  found so far are pruned, so the result is the true best static degree.

Every plan is version 2: each group names its memory scheme (plain, or MEMO offload at
its alpha where the sharding needs memory freed), carries per-group predictions (FLOPs,
ring bytes and peak bytes per rank) and passes `StepPlan.check(lengths)` and
`check_plan_memory` (no member over the device budget).

Ranks may differ (docs/planner.md, "Rank speeds" and "Heterogeneous clusters"): `speeds`
(each rank's speed relative to the cost model's reference rank; default the cluster's
nominal `rank_speeds`, 1 everywhere on a uniform cluster) make hdp and pow2 give a slow
rank proportionally less work and keep rings off it where they can; in a cluster of node
pools each rank packs up to its own pool's capacity and is checked against its own
device budget. The plan records the speeds its prediction assumed (`predicted.rank_speeds`)
and the per-rank capacities and budgets where they differ. The static baseline balances
its replicas by speed too (its strongest version); naive ignores speeds.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from scheduler.balance import Task, greedy_schedule, resize
from scheduler.cost import CostModel
from scheduler.errors import InfeasibleBatchError, SpecError
from scheduler.lns import improve
from scheduler.pairs import PairUnits
from scheduler.plan import (
    PLAN_VERSION,
    GroupMemory,
    GroupPredicted,
    MicroBatch,
    PlanMemory,
    Predicted,
    RingGroup,
    SeqSlice,
    StepPlan,
)
from scheduler.rank_memory import check_plan_memory
from scheduler.sharding import (
    OffloadPolicy,
    Shard,
    best_fit_packs,
    shard_batch,
    shard_sequence,
    validate_lengths,
)
from scheduler.simulator import default_offload, rank_speeds_of, simulate
from scheduler.specs import ClusterSpec, ModelSpec
from scheduler.topology import Topology
from scheduler.work import group_flops, ring_bytes_per_position
from scheduler.zigzag import max_local_tokens

Policy = Literal["hdp", "pow2", "naive", "static"]
POLICIES = ("hdp", "pow2", "naive", "static")
DEFAULT_TIME_LIMIT_S = 0.5

# A group before it is timed: (ring-ordered ranks, its sequences).
Group = tuple[tuple[int, ...], tuple[Shard, ...]]


@dataclass(frozen=True, kw_only=True)
class RankFigures:
    """What differs between the ranks of one planning call."""

    speeds: np.ndarray  # float64[world]: speed relative to the cost model's reference rank
    capacities: np.ndarray  # int64[world]: tokens each rank holds under the plain scheme
    budgets: list[int] | None  # each rank's device budget (node pools), None: all equal

    @property
    def uniform_speed(self) -> bool:
        return bool(np.all(self.speeds == 1.0))


def plan_batch(lengths: Sequence[int], cluster: ClusterSpec, model: ModelSpec, *,
               policy: Policy = "hdp", capacity_tokens: int | None = None,
               time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
               cost: CostModel | None = None, offload: OffloadPolicy | None = None,
               precision: str | None = None, optimizer_sharding: str | None = None,
               predictions: bool = True, speeds: Sequence[float] | None = None,
               pairs: Sequence[Sequence[int]] | None = None) -> StepPlan:
    """Plan one global batch on all ranks of `cluster` (see the module docstring).

    capacity_tokens None derives it from the memory model (model states for `precision`
    and `optimizer_sharding`, plain activations; scheduler/rank_memory.py; per rank from
    its pool's memory on a cluster of node pools); `cost` lets a caller pass a refitted
    CostModel (its precision and sharding then apply); `offload` overrides the cluster's
    default offload policy (`default_offload`); `predictions` False leaves out the
    per-group predictions (FLOPs, bytes, peaks); `speeds` gives each rank's speed
    relative to the cost model's reference rank (`scheduler.speeds.SpeedEstimator`
    measures them; default: the cluster's nominal `rank_speeds`). `pairs` (DPO pairs as
    (chosen, rejected) ids) are planned as one unit each, so both sequences of a pair
    land in one group (scheduler/pairs.py), and the plan lists them. Raises ValueError
    for a bad argument, DeviceMemoryError when the model states do not fit a device,
    InfeasibleBatchError for a sequence that cannot fit at all and PlanMemoryError when a
    given capacity_tokens overfills a device.
    """
    lengths = validate_lengths(lengths)
    if policy not in POLICIES:
        raise SpecError(f"policy={policy!r} is not valid; valid: {', '.join(POLICIES)}")
    if not time_limit_s >= 0:
        raise SpecError(f"time_limit_s={time_limit_s} must be >= 0 seconds")
    cost = cost or CostModel(model, cluster, precision=precision,
                             optimizer_sharding=optimizer_sharding,
                             objective="dpo" if pairs else "pretrain")
    world = cluster.world_size
    ranks = rank_figures(cluster, cost, capacity_tokens, speeds)
    capacity_tokens = int(ranks.capacities.min())
    units = PairUnits.of(lengths, pairs or [])
    try:
        shards = shard_batch(units.unit_lengths(capacity_tokens), capacity_tokens=capacity_tokens,
                             world_size=world, cost=cost,
                             offload=offload or default_offload(cluster))
    except InfeasibleBatchError as exc:
        raise units.infeasible(exc) from None
    if policy in ("hdp", "pow2"):
        variants = ("pow2",) if policy == "pow2" else ("free", "pow2")
        plans = [build_plan(units.expand(balanced_micro_batches(
                     shards, cluster, cost, ranks, pow2=v == "pow2", time_limit_s=time_limit_s,
                     seed=seed)), world, capacity_tokens, cost, ranks=ranks)
                 for v in variants]
        plan = fastest(plans, cluster, model, cost, ranks.speeds)
    else:
        topo = Topology(cluster)
        micro_batches = naive_micro_batches(shards, world, capacity_tokens) \
            if policy == "naive" else best_static_micro_batches(shards, cost, topo,
                                                                capacity_tokens, ranks.speeds)
        plan = build_plan(units.expand(micro_batches), world, capacity_tokens, cost,
                          ranks=ranks)
    plan.pairs = [(m[0], m[1]) for m in units.members if len(m) == 2] or None
    finish_plan(plan, cluster, model, cost, predictions=predictions, ranks=ranks)
    return plan


def rank_figures(cluster: ClusterSpec, cost: CostModel, capacity_tokens: int | None,
                 speeds: Sequence[float] | None) -> RankFigures:
    """Speeds, capacities and budgets of every rank (validating the arguments)."""
    world = cluster.world_size
    v = rank_speeds_of(cluster, world, speeds)
    if capacity_tokens is None:
        caps = cost.rank_capacity_tokens(world)
    elif capacity_tokens < 1:
        raise SpecError(f"capacity_tokens={capacity_tokens} must be >= 1 (or None to derive "
                        "it from the GPU memory)")
    else:
        cost.memory.check_states_fit()
        caps = [capacity_tokens] * world
    budgets = [cost.rank_memory(r, world).budget_bytes for r in range(world)] \
        if cluster.heterogeneous else None
    return RankFigures(speeds=v, capacities=np.asarray(caps, dtype=np.int64), budgets=budgets)


def balanced_micro_batches(shards: Sequence[Shard], cluster: ClusterSpec, cost: CostModel,
                           ranks: RankFigures, *, pow2: bool, time_limit_s: float,
                           seed: int) -> list[list[Group]]:
    """Greedy balance schedule + CP-SAT LNS, with ring sizes free or powers of two."""
    topo = Topology(cluster, pow2_rings=pow2)
    capacity_tokens = int(ranks.capacities.min())
    if pow2:
        shards = [pow2_shard(sh, topo, capacity_tokens, cost) for sh in shards]
    schedule = greedy_schedule(shards, cost=cost, topo=topo, capacity_tokens=capacity_tokens,
                               speeds=ranks.speeds, capacities=ranks.capacities)
    improve(schedule, cost, time_limit_s=time_limit_s, seed=seed)
    return layer_tasks(schedule.tasks(cost), cluster.world_size)


def fastest(plans: Sequence[StepPlan], cluster: ClusterSpec, model: ModelSpec,
            cost: CostModel, speeds: np.ndarray | None = None) -> StepPlan:
    """The plan with the smallest simulated makespan (the first on ties)."""
    if len(plans) == 1:
        return plans[0]
    return min(plans, key=lambda p: simulate(p, cluster, model, cost=cost,
                                             speeds=speeds).makespan_s)


def finish_plan(plan: StepPlan, cluster: ClusterSpec, model: ModelSpec, cost: CostModel, *,
                predictions: bool = True, ranks: RankFigures | None = None) -> StepPlan:
    """Simulate `plan` into its `predicted` figures (at `ranks`' speeds, default the
    cluster's) and check it against each rank's device budget."""
    speeds = None if ranks is None else ranks.speeds
    sim = simulate(plan, cluster, model, cost=cost, speeds=speeds)
    uniform = ranks is None or ranks.uniform_speed
    plan.predicted = Predicted(makespan_s=sim.makespan_s, lower_bound_s=sim.lower_bound_s,
                               per_rank_busy_s=list(sim.per_rank_busy_s),
                               step_overhead_s=sim.step_overhead_s,
                               groups=predict_groups(plan, cost, sim) if predictions else None,
                               rank_speeds=None if uniform or speeds is None
                               else [float(x) for x in speeds])
    check_plan_memory(plan, cost.memory, None if ranks is None else ranks.budgets)
    return plan


def pow2_shard(sh: Shard, topo: Topology, capacity_tokens: int, cost: CostModel) -> Shard:
    """`sh` on the smallest power-of-two ring it fits (with offload where it needs it)."""
    d = topo.allowed_at_least(sh.ring_size)
    if d is not None:
        return resize(sh, d, capacity_tokens, cost)
    largest = 1 << (topo.world_size.bit_length() - 1)  # no power of two >= D(s) in the world
    return shard_sequence(sh.seq_id, sh.length, capacity_tokens=capacity_tokens,
                          world_size=largest, cost=cost, offload="needed")


def predict_groups(plan: StepPlan, cost: CostModel, sim) -> list[GroupPredicted]:
    """Per group: time, and per member the FLOPs (scheduler.work), ring bytes sent and
    device peak (scheduler.rank_memory), in plan order."""
    out = []
    dtype, model = cost.memory.dtype, cost.model
    timings = iter(sim.timeline)
    for m, mb in enumerate(plan.micro_batches):
        for gi, g in enumerate(mb.groups):
            timing = next(timings)
            assert g.memory is not None, "build_plan gives every group its memory scheme"
            scheme = g.memory.as_scheme()
            seqs = [s.length for s in g.sequences]
            d = g.ring_size
            mem = cost.memory.group_prediction(seqs, d, scheme)
            out.append(GroupPredicted(
                micro_batch=m, group=gi, seconds=timing.end_s - timing.start_s,
                flops_per_rank=[group_flops(model, seqs, ring_size=d, position=j, scheme=scheme,
                                            objective=cost.objective).total for j in range(d)],
                bytes_sent_per_rank=[b.total for b in ring_bytes_per_position(
                    model, seqs, ring_size=d, dtype=dtype, objective=cost.objective)],
                peak_bytes_per_rank=list(mem.peak_bytes_per_rank),
                host_bytes_per_rank=list(mem.host_bytes_per_rank)))
    return out


def layer_tasks(tasks: Sequence[Task], world_size: int) -> list[list[Group]]:
    """Micro-batches from timed groups: a group goes one micro-batch after the latest one
    any of its ranks already runs, in start-time order, so every rank keeps its order and
    groups of one micro-batch use disjoint ranks."""
    last = np.full(world_size, -1, dtype=np.int64)
    out: list[list[Group]] = []
    for t in sorted(tasks, key=lambda t: (t.start_s, t.ranks[0], -len(t.ranks))):
        m = int(last[list(t.ranks)].max()) + 1
        if m == len(out):
            out.append([])
        out[m].append((t.ranks, t.shards))
        last[list(t.ranks)] = m
    return out


def naive_micro_batches(shards: Sequence[Shard], world_size: int,
                        capacity_tokens: int) -> list[list[Group]]:
    """Alg. 1 without balancing: rings at D(s) and best-fit packs, first fit in order."""
    rings = sorted((sh for sh in shards if sh.ring_size > 1),
                   key=lambda sh: (-sh.length, sh.seq_id))
    packs = best_fit_packs([sh for sh in shards if sh.ring_size == 1],
                           capacity_tokens=capacity_tokens)
    groups = [(sh.ring_size, (sh,)) for sh in rings] + [(1, tuple(p)) for p in packs]
    out: list[list[Group]] = [[]]
    cursor = 0
    for size, seqs in groups:
        if cursor + size > world_size:
            out.append([])
            cursor = 0
        out[-1].append((tuple(range(cursor, cursor + size)), seqs))
        cursor += size
    return out


def static_micro_batches(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                         capacity_tokens: int, p: int | None = None,
                         speeds: np.ndarray | None = None) -> list[list[Group]]:
    """The static mesh at CP degree p (default: the smallest that fits every sequence):
    floor(N / p) replicas, LPT over replicas, best-fit packs per replica whose members
    each hold at most capacity_tokens (zigzag's uneven chunks counted exactly)."""
    p = p or max(sh.ring_size for sh in shards)
    out: list[list[Group]] = []
    for k, packs in enumerate(static_replicas(shards, cost, topo, capacity_tokens, p, speeds)):
        ranks = tuple(range(k * p, (k + 1) * p))
        for j, pack in enumerate(packs):
            if j == len(out):
                out.append([])
            out[j].append((ranks, tuple(pack)))
    return out


def replica_speeds(speeds: np.ndarray | None, world_size: int, p: int) -> list[float]:
    """Speed of each replica of the static mesh at degree p: its slowest member's."""
    replicas = world_size // p
    if speeds is None:
        return [1.0] * replicas
    return [float(speeds[k * p:(k + 1) * p].min()) for k in range(replicas)]


def static_replicas(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                    capacity_tokens: int, p: int,
                    speeds: np.ndarray | None = None) -> list[list[list[Shard]]]:
    """Per replica of the static mesh at degree p, its packs (micro-batches) in order:
    LPT over replicas, each sequence onto the replica where it finishes first (at the
    replica's speed: its slowest member's)."""
    rs = replica_speeds(speeds, topo.world_size, p)
    bw = topo.ring_bandwidth(list(range(p)))
    on_p = [resize(sh, p, capacity_tokens, cost) for sh in shards]
    timed = sorted(((cost.seq_time(sh.length, p, bandwidth_gbps=bw,
                                   offload_ratio=sh.offload_ratio), sh) for sh in on_p),
                   key=lambda t: (-t[0], t[1].seq_id))
    heaps: dict[float, list[tuple[float, int]]] = {v: [] for v in set(rs)}
    for k, v in enumerate(rs):
        heaps[v].append((0.0, k))
    per_replica: list[list[Shard]] = [[] for _ in rs]
    for t, sh in timed:
        v = min(heaps, key=lambda v: (heaps[v][0][0] + t / v, -v))
        load, k = heapq.heappop(heaps[v])
        per_replica[k].append(sh)
        heapq.heappush(heaps[v], (load + t / v, k))
    return [ring_packs(seqs, p, capacity_tokens) for seqs in per_replica]


def static_makespan(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                    capacity_tokens: int, p: int, speeds: np.ndarray | None = None) -> float:
    """What `simulate` gives the static mesh at degree p, without building the plan:
    replicas never share ranks, so the step is the slowest replica's packs in a row."""
    bw = topo.ring_bandwidth(list(range(p)))
    rs = replica_speeds(speeds, topo.world_size, p)
    slowest = max(sum(cost.at_speed(v).group_seconds_of(pack, p, bw) for pack in packs)
                  for v, packs in zip(rs, static_replicas(shards, cost, topo, capacity_tokens,
                                                          p, speeds), strict=True))
    return slowest + cost.step_overhead_s(topo.world_size)


def ring_packs(shards: Sequence[Shard], ring_size: int, capacity_tokens: int
               ) -> list[list[Shard]]:
    """Best-fit decreasing packs for a ring: a sequence of s tokens puts at most
    ceil(s (1 - r) / d) on a member, and a pack's members hold at most capacity_tokens."""
    if ring_size == 1:
        return best_fit_packs(shards, capacity_tokens=capacity_tokens)
    scaled = [Shard(seq_id=sh.seq_id, length=math.ceil(sh.length * (1 - sh.offload_ratio)
                                                       / ring_size - 1e-9),
                    ring_size=1, offload_ratio=0.0) for sh in shards]
    by_id = {sh.seq_id: sh for sh in shards}
    return [[by_id[x.seq_id] for x in pack]
            for pack in best_fit_packs(scaled, capacity_tokens=capacity_tokens)]


def static_bound(shards: Sequence[Shard], p: int, cost: CostModel, topo: Topology,
                 speeds: np.ndarray | None = None) -> float:
    """A lower bound on the static mesh's makespan at degree p: the replicas' average load
    and the longest sequence's time, each sequence plain (a memory scheme and the packs'
    overhead only add to it) and at its quickest on any replica's speed."""
    bw = topo.ring_bandwidth(list(range(p)))
    lengths = np.array([sh.length for sh in shards], dtype=np.float64)
    t = np.min([cost.at_speed(v).seq_times(lengths, p, bandwidth_gbps=bw)
                for v in set(replica_speeds(speeds, topo.world_size, p))], axis=0)
    return max(float(t.sum()) / (topo.world_size // p), float(t.max()))


def best_static_micro_batches(shards: Sequence[Shard], cost: CostModel, topo: Topology,
                              capacity_tokens: int,
                              speeds: np.ndarray | None = None) -> list[list[Group]]:
    """The fastest static mesh over every CP degree: degrees in order of `static_bound`,
    each simulated exactly (`static_makespan`), until no remaining bound can beat the best."""
    speeds = None if speeds is None or np.all(speeds == 1.0) else speeds
    p_min = max(sh.ring_size for sh in shards)
    overhead = cost.step_overhead_s(topo.world_size)
    bounds = sorted((static_bound(shards, p, cost, topo, speeds) + overhead, p)
                    for p in range(p_min, topo.world_size + 1))
    best_p, best_s = p_min, math.inf
    for bound, p in bounds:
        if bound >= best_s:
            break
        makespan = static_makespan(shards, cost, topo, capacity_tokens, p, speeds)
        if makespan < best_s:
            best_p, best_s = p, makespan
    return static_micro_batches(shards, cost, topo, capacity_tokens, best_p, speeds)


def static_degree(plan: StepPlan) -> int:
    """The CP degree of a static plan (its largest ring)."""
    return max(g.ring_size for _, g in plan.groups())


def build_plan(micro_batches: Sequence[Sequence[Group]], world_size: int,
               capacity_tokens: int, cost: CostModel, *,
               ranks: RankFigures | None = None) -> StepPlan:
    """A version-2 plan: every group with its memory scheme (plain, or MEMO offload when a
    sequence needs memory freed, at the alpha that hides its copies), and each rank's
    capacity and device budget where they differ."""
    mem = cost.memory
    caps = None if ranks is None else [int(x) for x in ranks.capacities]
    caps = caps if caps and len(set(caps)) > 1 else None
    budgets = None if ranks is None or ranks.budgets is None or len(set(ranks.budgets)) < 2 \
        else list(ranks.budgets)
    mbs = [MicroBatch(groups=[
        RingGroup(ranks=list(ranks), sequences=[
            SeqSlice(id=sh.seq_id, length=sh.length)
            for sh in sorted(seqs, key=lambda x: x.seq_id)],
            memory=group_scheme(seqs, len(ranks), cost))
        for ranks, seqs in mb]) for mb in micro_batches if mb]
    return StepPlan(version=PLAN_VERSION, world_size=world_size, capacity_tokens=capacity_tokens,
                    rank_capacity_tokens=caps, micro_batches=mbs, memory=PlanMemory(
                        precision=mem.precision, optimizer_sharding=mem.sharding,
                        model_state_bytes=mem.states.total, shard_mirror=mem.shard_mirror,
                        device_budget_bytes=min(budgets) if budgets else mem.budget_bytes,
                        device_budget_bytes_per_rank=budgets))


def group_scheme(seqs: Sequence[Shard], ring_size: int, cost: CostModel) -> GroupMemory:
    """plain, or MEMO offload at the alpha that hides its copies when a sequence needs
    memory freed (`CostModel.group_seconds_of` times it the same way)."""
    if not any(sh.offload_ratio > 0 for sh in seqs):
        return GroupMemory()
    lengths = [sh.length for sh in seqs]
    alpha = cost.memo_alpha(max_local_tokens(lengths, ring_size),
                            round(sum(lengths) / len(lengths)))
    return GroupMemory(scheme="offload", offload_ratio=alpha)
