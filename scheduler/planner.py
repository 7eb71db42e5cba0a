"""`plan_batch`: one global batch of sequence lengths in, a StepPlan out.

Three policies on the same cost model, so that their simulated makespans compare fairly:

- "hdp": the ByteScale planner. Data-aware sharding (Alg. 1, Eq. 3; `scheduler.sharding`),
  the greedy balance scheduler (Alg. 2; `scheduler.balance`) improved by CP-SAT
  large-neighbourhood search under `time_limit_s` (`scheduler.lns`).
- "naive": naive HDP, Alg. 1 without balancing: every sequence on its minimum ring D(s),
  short ones best-fit packed, groups laid into micro-batches in order (longest first) on
  consecutive ranks until a micro-batch is full.
- "static": the static mesh of Megatron/torchtitan: one context-parallel degree p for
  everyone, the smallest that fits the longest sequence (no divisibility restriction,
  which favours the baseline), floor(N / p) data-parallel replicas on consecutive ranks,
  each sequence on its replica's ring, sequences spread over replicas longest first onto
  the least-loaded one and packed per replica into micro-batches of p x capacity tokens.

Every plan passes `StepPlan.check(lengths)` and carries `predicted` from the simulator.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np

from scheduler.balance import Task, greedy_schedule, resize
from scheduler.cost import CostModel
from scheduler.lns import improve
from scheduler.plan import MicroBatch, Predicted, RingGroup, SeqSlice, StepPlan
from scheduler.sharding import (
    OffloadPolicy,
    Shard,
    best_fit_packs,
    shard_batch,
    validate_lengths,
)
from scheduler.simulator import default_offload, simulate
from scheduler.specs import ClusterSpec, ModelSpec
from scheduler.topology import Topology

Policy = Literal["hdp", "naive", "static"]
POLICIES = ("hdp", "naive", "static")
DEFAULT_TIME_LIMIT_S = 0.5

# A group before it is timed: (ring-ordered ranks, its sequences).
Group = tuple[tuple[int, ...], tuple[Shard, ...]]


def plan_batch(lengths: Sequence[int], cluster: ClusterSpec, model: ModelSpec, *,
               policy: Policy = "hdp", capacity_tokens: int | None = None,
               time_limit_s: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
               cost: CostModel | None = None, offload: OffloadPolicy | None = None) -> StepPlan:
    """Plan one global batch on all ranks of `cluster` (see the module docstring).

    capacity_tokens None derives it from the GPU memory and the cost model's activation
    bytes per token; `cost` lets a caller pass a refitted CostModel; `offload` overrides
    the cluster's default offload policy (`default_offload`). Raises ValueError for a bad
    argument and InfeasibleBatchError for a sequence that cannot fit at all.
    """
    lengths = validate_lengths(lengths)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not valid; valid: {', '.join(POLICIES)}")
    if not time_limit_s >= 0:
        raise ValueError(f"time_limit_s={time_limit_s} must be >= 0 seconds")
    cost = cost or CostModel(model, cluster)
    world = cluster.world_size
    if capacity_tokens is None:
        capacity_tokens = cost.capacity_tokens(world)
    elif capacity_tokens < 1:
        raise ValueError(f"capacity_tokens={capacity_tokens} must be >= 1 (or None to derive "
                         "it from the GPU memory)")
    shards = shard_batch(lengths, capacity_tokens=capacity_tokens, world_size=world, cost=cost,
                         offload=offload or default_offload(cluster))
    topo = Topology(cluster)
    if policy == "hdp":
        schedule = greedy_schedule(shards, cost=cost, topo=topo, capacity_tokens=capacity_tokens)
        improve(schedule, cost, time_limit_s=time_limit_s, seed=seed)
        micro_batches = layer_tasks(schedule.tasks(cost), world)
    elif policy == "naive":
        micro_batches = naive_micro_batches(shards, world, capacity_tokens)
    else:
        micro_batches = static_micro_batches(shards, cost, topo, capacity_tokens)
    plan = build_plan(micro_batches, world, capacity_tokens)
    sim = simulate(plan, cluster, model, cost=cost)
    plan.predicted = Predicted(makespan_s=sim.makespan_s, lower_bound_s=sim.lower_bound_s,
                               per_rank_busy_s=list(sim.per_rank_busy_s))
    return plan


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
                         capacity_tokens: int) -> list[list[Group]]:
    """The static mesh: CP degree p = max D(s), floor(N / p) replicas, LPT + packing."""
    p = max(sh.ring_size for sh in shards)
    replicas = topo.world_size // p
    bw = topo.ring_bandwidth(list(range(p)))
    on_p = [resize(sh, p, capacity_tokens, cost) for sh in shards]
    timed = sorted(((cost.seq_time(sh.length, p, bandwidth_gbps=bw,
                                   offload_ratio=sh.offload_ratio), sh) for sh in on_p),
                   key=lambda t: (-t[0], t[1].seq_id))
    heap = [(0.0, k) for k in range(replicas)]
    per_replica: list[list[Shard]] = [[] for _ in range(replicas)]
    for t, sh in timed:
        load, k = heapq.heappop(heap)
        per_replica[k].append(sh)
        heapq.heappush(heap, (load + t, k))
    out: list[list[Group]] = []
    for k, seqs in enumerate(per_replica):
        ranks = tuple(range(k * p, (k + 1) * p))
        for j, pack in enumerate(best_fit_packs(seqs, capacity_tokens=p * capacity_tokens)):
            if j == len(out):
                out.append([])
            out[j].append((ranks, tuple(pack)))
    return out


def build_plan(micro_batches: Sequence[Sequence[Group]], world_size: int,
               capacity_tokens: int) -> StepPlan:
    mbs = [MicroBatch(groups=[
        RingGroup(ranks=list(ranks), sequences=[
            SeqSlice(id=sh.seq_id, length=sh.length, offload_ratio=sh.offload_ratio)
            for sh in sorted(seqs, key=lambda x: x.seq_id)])
        for ranks, seqs in mb]) for mb in micro_batches if mb]
    return StepPlan(world_size=world_size, capacity_tokens=capacity_tokens, micro_batches=mbs)
