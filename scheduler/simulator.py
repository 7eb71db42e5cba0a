"""Simulator: the per-rank timeline a StepPlan produces under the cost model.

Each rank runs the micro-batches it appears in, in order; a group starts when all its
ranks are free (ring members are synchronized) and lasts the cost model's group time at
the bandwidth of its slowest ring hop (`Topology.ring_bandwidth`), under the memory scheme
the plan names for it, at its slowest member's speed (`CostModel.at_speed`: node pools,
measured stragglers); after its last micro-batch every rank pays the step's collectives
and optimizer update (`CostModel.step_overhead_s`). From the timeline: makespan,
per-rank busy time and exposed communication. Beside it, the perfect-balance lower bound
of the batch (ByteScale, arXiv 2502.21231, section 6): total compute over the ranks'
summed speed (the number of ranks when all run at the reference speed), and no sequence
faster than its best ring at the fastest rank's speed.

Single-threaded and allocation-light: one pass over the plan's groups in micro-batch
order, which respects every rank's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.balance import best_ring_time
from scheduler.cost import CostModel
from scheduler.errors import InfeasibleBatchError
from scheduler.plan import RingGroup, StepPlan, group_memory
from scheduler.sharding import OffloadPolicy, Shard, validate_lengths
from scheduler.specs import HARDWARE_FIELDS, ClusterSpec, ModelSpec
from scheduler.topology import Topology


@dataclass(frozen=True, kw_only=True)
class GroupTiming:
    """When one group of the plan runs."""

    micro_batch: int  # index in plan.micro_batches
    group: int  # index in that micro-batch's groups
    ranks: tuple[int, ...]
    start_s: float
    end_s: float
    exposed_comm_s: float  # per-rank ring communication not hidden behind attention


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """What a plan costs on the cost model (seconds)."""

    makespan_s: float  # when the last rank finishes
    lower_bound_s: float  # perfect-balance bound of the batch on this cluster
    per_rank_busy_s: tuple[float, ...]  # time each rank spends running groups
    per_rank_exposed_comm_s: tuple[float, ...]  # of which communication not hidden
    timeline: tuple[GroupTiming, ...]  # every group, in plan order
    step_overhead_s: float = 0.0  # collectives + optimizer after the last micro-batch

    @property
    def exposed_comm_s(self) -> float:
        """Largest exposed communication time of any rank."""
        return max(self.per_rank_exposed_comm_s, default=0.0)

    @property
    def ratio(self) -> float:
        """makespan / lower bound (>= 1)."""
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0


def default_offload(cluster: ClusterSpec) -> OffloadPolicy:
    """'auto' where the host has more room per rank than the device, else 'needed'.

    On the `cpu` preset host and device share the same RAM (3 GiB of host per rank vs 12
    of "device"), so offloading buys nothing: use it only when a sequence needs it.
    """
    host_per_rank = cluster.host_memory_gib / cluster.gpus_per_node
    return "auto" if host_per_rank > cluster.gpu_memory_gib else "needed"


def rank_speeds_of(cluster: ClusterSpec, world_size: int,
                   speeds: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """float64[world_size] speeds: the given ones, or the cluster's nominal
    (`ClusterSpec.rank_speeds`: pool TFLOP/s over the reference's)."""
    if speeds is None:
        nominal = cluster.rank_speeds() if cluster.pools is not None else ()
        out = np.ones(world_size)
        n = min(world_size, len(nominal))
        out[:n] = nominal[:n]
        return out
    out = np.asarray(speeds, dtype=np.float64)
    if out.shape != (world_size,) or not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ValueError(f"speeds: expected {world_size} finite values > 0 (one per rank), "
                         f"got {list(out.ravel())[:8]}{'...' if out.size > 8 else ''}")
    return out


def lower_bound(lengths: Sequence[int], cluster: ClusterSpec, model: ModelSpec, *,
                capacity_tokens: int, world_size: int | None = None,
                cost: CostModel | None = None,
                speeds: Sequence[float] | np.ndarray | None = None) -> float:
    """max(total compute / summed speed, longest sequence on its best ring), seconds.

    Valid for every plan of the batch, whatever its offload policy: the longest sequence
    may use any ring from the smallest one offload could ever allow, at the fastest rank's
    speed. Both terms include the step's collectives and optimizer update
    (`CostModel.step_overhead_s`), which every plan of the world pays after its last
    micro-batch. `speeds`: each rank's (default: the cluster's nominal `rank_speeds`).
    """
    cost = cost or CostModel(model, cluster)
    topo = Topology(cluster, world_size)
    v = rank_speeds_of(cluster, topo.world_size, speeds)
    s = np.asarray(validate_lengths(lengths), dtype=np.float64)
    work = (cost.a * float(np.dot(s, s)) + cost.b * float(s.sum())) / float(v.sum())
    i = int(np.argmax(s))
    longest = int(s[i])
    ring_cost, ring_topo = _best_case(cost, cluster, topo)
    per_rank = max(capacity_tokens, ring_cost.offload_capacity_tokens())
    if longest > per_rank * topo.world_size:
        raise InfeasibleBatchError(i, longest, per_rank * topo.world_size)
    d = max(1, math.ceil(longest / per_rank))
    sh = Shard(seq_id=i, length=longest, ring_size=d, offload_ratio=1.0)
    overhead = cost.step_overhead_s(topo.world_size)
    fastest = ring_cost.at_speed(float(v.max()))
    return max(work, best_ring_time(sh, fastest, ring_topo, capacity_tokens)) + overhead


def _best_case(cost: CostModel, cluster: ClusterSpec, topo: Topology
               ) -> tuple[CostModel, Topology]:
    """What the longest sequence's ring term is computed on: `cost` and `topo`, or in a
    cluster of node pools a uniform cluster with the best of every pool's figures (most
    memory, host memory and bandwidth; a ring may sit in any pool, and none is faster
    than that), with `cost`'s coefficients (its precision, sharding and refit)."""
    if cluster.pools is None:
        return cost, topo
    best = {f: max(getattr(p, f) for p in cluster.pools) for f in HARDWARE_FIELDS}
    uniform = ClusterSpec(num_nodes=cluster.num_nodes, gpus_per_node=cluster.gpus_per_node,
                          **best)
    out = CostModel(cost.model, uniform, precision=cost.precision,
                    optimizer_sharding=cost.optimizer_sharding,
                    memory_fraction=cost.memory_fraction, objective=cost.objective,
                    shard_mirror=cost.memory.shard_mirror)
    out.a, out.b, out.c, out.flops_per_s = cost.a, cost.b, cost.c, cost.flops_per_s
    return out, Topology(uniform, topo.world_size)


def simulate(plan: StepPlan, cluster: ClusterSpec, model: ModelSpec, *,
             cost: CostModel | None = None,
             speeds: Sequence[float] | np.ndarray | None = None) -> SimResult:
    """Timeline of `plan` on `cluster` (whose world may be larger than the plan's): every
    group under the memory scheme the plan names at its slowest member's speed, then the
    step's collectives and optimizer update on every rank after its last micro-batch.
    `speeds`: each rank's speed (default: the cluster's nominal `rank_speeds`)."""
    cost = cost or CostModel(model, cluster)
    topo = Topology(cluster, plan.world_size)
    v = rank_speeds_of(cluster, plan.world_size, speeds)
    free = np.zeros(plan.world_size)
    busy = np.zeros(plan.world_size)
    exposed = np.zeros(plan.world_size)
    timeline = []
    for m, mb in enumerate(plan.micro_batches):
        for gi, g in enumerate(mb.groups):
            ranks = list(g.ranks)
            dur, comm = group_seconds(g, cost.at_speed(float(v[ranks].min())),
                                      topo.ring_bandwidth(ranks))
            start = float(free[ranks].max())
            free[ranks] = start + dur
            busy[ranks] += dur
            exposed[ranks] += comm
            timeline.append(GroupTiming(micro_batch=m, group=gi, ranks=tuple(ranks),
                                        start_s=start, end_s=start + dur, exposed_comm_s=comm))
    lengths = [0] * (max((s.id for _, g in plan.groups() for s in g.sequences), default=-1) + 1)
    for _, g in plan.groups():
        for s in g.sequences:
            lengths[s.id] = s.length
    present = [x for x in lengths if x > 0]
    bound = lower_bound(present, cluster, model, capacity_tokens=plan.capacity_tokens,
                        world_size=plan.world_size, cost=cost, speeds=v) if present else 0.0
    overhead = cost.step_overhead_s(plan.world_size)
    return SimResult(makespan_s=float(free.max()) + overhead, lower_bound_s=bound,
                     per_rank_busy_s=tuple(busy.tolist()),
                     per_rank_exposed_comm_s=tuple(exposed.tolist()), timeline=tuple(timeline),
                     step_overhead_s=overhead)


def group_seconds(g: RingGroup, cost: CostModel, bandwidth_gbps: float) -> tuple[float, float]:
    """(per-rank time, exposed ring communication) of one group under its memory scheme."""
    scheme = group_memory(g, cost.model).as_scheme()
    costs = [cost.seq_cost(s.length, g.ring_size, bandwidth_gbps=bandwidth_gbps, scheme=scheme)
             for s in g.sequences]
    return cost.c + sum(x.total_s for x in costs), sum(x.exposed_comm_s for x in costs)
