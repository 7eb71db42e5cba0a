"""Simulator: a hand-timed plan, rings waiting for their slowest member, exposed ring
communication, and the lower bound's two terms."""

from __future__ import annotations

import pytest

from scheduler import CostModel, lower_bound, simulate
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.specs import cluster_preset, model_preset

TINY = model_preset("tiny")
LLAMA = model_preset("llama-7b")


def group(ranks, *lengths, start_id=0):
    return RingGroup(ranks=list(ranks), sequences=[
        SeqSlice(id=start_id + i, length=s) for i, s in enumerate(lengths)])


def exposed_by_hand(model, cost: CostModel, s: int, d: int, bw_gbps: float) -> float:
    """Ring hand-offs not hidden, restated from parallelism/ring_attention.py: per layer,
    d-1 forward steps send a KV block (compute dtype) behind a half block of attention
    forward (4 h FLOPs per pair), d-1 backward steps send the KV block and the float32
    dK/dV accumulator behind a half block of attention backward (10 h per pair), and the
    accumulator's last hop home overlaps nothing."""
    if d == 1:
        return 0.0
    L, kv, h = model.num_layers, model.num_kv_heads * model.head_dim, model.hidden_size
    t, bw, flops = s / d, bw_gbps * 1e9, cost.cluster.achieved_tflops * 1e12
    kv_s = L * 2 * kv * model.dtype_bytes * t / bw
    dkv_s = L * 2 * kv * 4 * t / bw
    half_block = L * t * (t / 2)  # (query, key) pairs of one ring step, every layer
    fwd = 4 * h * half_block / flops
    bwd = 10 * h * half_block / flops
    return (d - 1) * max(0.0, kv_s - fwd) + (d - 1) * max(0.0, kv_s + dkv_s - bwd) + dkv_s


def by_hand(cost: CostModel, lengths, d: int, bw_gbps: float, model=TINY) -> float:
    """c + per sequence: (a s^2 + b s)/d + the exposed ring communication."""
    return cost.c + sum((cost.a * s * s + cost.b * s) / d
                        + exposed_by_hand(model, cost, s, d, bw_gbps) for s in lengths)


def test_hand_timed_plan_on_two_nodes():
    # 2 nodes x 2 ranks. mb0: a ring over ranks 0,1 (one node) and a pack on rank 2.
    # mb1: a ring over 1,2,3 (two nodes: NIC bandwidth); it waits for ranks 1 and 2.
    cluster = cluster_preset("cpu", num_ranks=4, gpus_per_node=2)
    cost = CostModel(TINY, cluster)
    plan = StepPlan(world_size=4, capacity_tokens=10_000, micro_batches=[
        MicroBatch(groups=[group([0, 1], 3001), group([2], 700, 11, start_id=1)]),
        MicroBatch(groups=[group([1, 2, 3], 5003, start_id=3)]),
    ])
    plan.check([3001, 700, 11, 5003])
    t_ring = by_hand(cost, [3001], 2, cluster.intra_node_bandwidth_gbps)
    t_pack = by_hand(cost, [700, 11], 1, 1.0)
    t_big = by_hand(cost, [5003], 3, cluster.inter_node_bandwidth_gbps)
    sim = simulate(plan, cluster, TINY)
    start_big = max(t_ring, t_pack)
    assert sim.timeline[2].start_s == pytest.approx(start_big, rel=1e-12)
    # After its last micro-batch every rank runs the step's collectives and AdamW.
    overhead = cost.step_overhead_s(4)
    assert sim.step_overhead_s == overhead > 0
    assert sim.makespan_s == pytest.approx(start_big + t_big + overhead, rel=1e-12)
    assert sim.per_rank_busy_s == pytest.approx([t_ring, t_ring + t_big, t_pack + t_big, t_big],
                                                rel=1e-12)
    assert sim.makespan_s >= sim.lower_bound_s


def test_exposed_communication_is_reported():
    # A 3-rank ring over two h100 nodes for a short sequence: the KV hand-off cannot
    # hide behind so little attention.
    cluster = cluster_preset("h100", num_ranks=16)
    cost = CostModel(LLAMA, cluster)
    plan = StepPlan(world_size=16, capacity_tokens=50_000, micro_batches=[
        MicroBatch(groups=[group([6, 7, 8], 3000)])])
    sim = simulate(plan, cluster, LLAMA)
    want = exposed_by_hand(LLAMA, cost, 3000, 3, 50.0)
    assert sim.per_rank_exposed_comm_s[7] == pytest.approx(want, rel=1e-12)
    assert sim.exposed_comm_s == sim.per_rank_exposed_comm_s[6] > 0
    assert sim.per_rank_exposed_comm_s[0] == 0.0


def test_lower_bound_is_average_work_for_many_equal_sequences():
    cluster = cluster_preset("cpu", num_ranks=4)
    cost = CostModel(TINY, cluster)
    lengths = [37] * 40
    work = 40 * (cost.a * 37**2 + cost.b * 37) / 4 + cost.step_overhead_s(4)
    assert lower_bound(lengths, cluster, TINY, capacity_tokens=1000) == pytest.approx(work,
                                                                                   rel=1e-12)


def test_lower_bound_is_the_longest_sequence_on_its_best_ring():
    # One 2M-token sequence on 1,024 h100s: its ring is communication-bound long before
    # 1,024 ranks, so the bound is its best ring time, far above average work. Check it
    # against every ring size, brute force.
    cluster = cluster_preset("h100", num_ranks=1024)
    cost = CostModel(LLAMA, cluster)
    s = 2 * 1024 * 1024
    capacity = cost.capacity_tokens(1024)
    got = lower_bound([s, 1000], cluster, LLAMA, capacity_tokens=capacity)
    d_min = -(-s // max(capacity, cost.offload_capacity_tokens()))
    best = min(cost.seq_time(s, d, bandwidth_gbps=450.0 if d <= 8 else 50.0)
               for d in range(d_min, 1025))
    assert got == pytest.approx(cost.c + best + cost.step_overhead_s(1024), rel=1e-12)
    assert got > (cost.compute_s(s) + cost.compute_s(1000)) / 1024
