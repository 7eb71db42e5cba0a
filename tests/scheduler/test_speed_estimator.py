"""SpeedEstimator: a rank measured 2x slower than predicted converges to 0.5 within a few
steps and no faster than its step bound, one noisy step does not move it, the typical rank
stays 1 when the whole model is off, and a ring's slowness is pinned on the member whose
packed groups show it (not on the others), and load that slows a whole step cancels out."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import CostModel
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.specs import cluster_preset, model_preset
from scheduler.speeds import SpeedEstimator

TINY = model_preset("tiny")
CPU4 = cluster_preset("cpu", num_ranks=4)
COST = CostModel(TINY, CPU4)


def packed_plan(lengths_per_rank: list[list[int]]) -> StepPlan:
    """One packed group per rank per micro-batch: rank r runs lengths_per_rank[r]."""
    mbs, next_id = [], 0
    for k in range(max(len(x) for x in lengths_per_rank)):
        groups = []
        for r, mine in enumerate(lengths_per_rank):
            if k < len(mine):
                groups.append(RingGroup(ranks=[r], sequences=[SeqSlice(id=next_id,
                                                                       length=mine[k])]))
                next_id += 1
        mbs.append(MicroBatch(groups=groups))
    return StepPlan(world_size=len(lengths_per_rank), capacity_tokens=10_000, micro_batches=mbs)


def predicted(g: RingGroup) -> float:
    """The reference time of a group, independently of the estimator: c + sum of
    (a s^2 + b s) / d (packed groups have no ring traffic)."""
    return COST.c + sum((COST.a * s.length ** 2 + COST.b * s.length) / g.ring_size
                        for s in g.sequences)


def measured(plan: StepPlan, factor: dict[int, float], noise=None) -> dict[int, list[float]]:
    """Each rank's micro-batch times: the prediction x the rank's slowdown (x noise)."""
    rng = noise or (lambda: 1.0)
    return {r: [predicted(g) * factor.get(r, 1.0) * rng() for _, g in plan.micro_batches_of(r)]
            for r in range(plan.world_size)}


def test_a_rank_twice_as_slow_converges_to_half_within_bounded_steps():
    est = SpeedEstimator(CPU4)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(6):
        plan = packed_plan([[int(x) for x in rng.integers(50, 400, size=3)] for _ in range(4)])
        est.observe(plan, measured(plan, {2: 2.0}, noise=lambda: rng.uniform(0.95, 1.05)))
        history.append(est.update(COST).copy())
    # 3 samples after the first step; a correction moves by at most 1.5x per update.
    assert history[0][2] == pytest.approx(1 / 1.5, abs=0.026)
    assert history[-1][2] == pytest.approx(0.5)
    assert all(h[r] == 1.0 for h in history for r in (0, 1, 3))


def test_one_noisy_step_does_not_swing_the_estimate():
    est = SpeedEstimator(CPU4)
    plan = packed_plan([[100, 200, 300]] * 4)
    for _ in range(4):
        est.observe(plan, measured(plan, {}))
        est.update(COST)
    est.observe(plan, measured(plan, {0: 10.0}))  # one step 10x slow on rank 0
    assert est.update(COST)[0] == 1.0  # 3 of its 15 samples: the median does not move


def test_a_model_off_everywhere_makes_nobody_a_straggler():
    est = SpeedEstimator(CPU4)
    plan = packed_plan([[100, 300]] * 4)
    for _ in range(3):
        est.observe(plan, measured(plan, {r: 3.0 for r in range(4)}))
        speeds = est.update(COST)
    assert list(speeds) == [1.0] * 4


def test_a_slow_ring_is_pinned_on_the_member_whose_packs_are_slow():
    # Ranks 0 and 1 share a ring each step, then run packs; only rank 1's packs are slow, so
    # the ring's slowness is rank 1's and rank 0 stays 1. Rank 3 only ever runs in rings
    # with rank 2, and nothing else explains that ring's slowness: it goes to both.
    est = SpeedEstimator(CPU4)
    plan = StepPlan(world_size=4, capacity_tokens=10_000, micro_batches=[
        MicroBatch(groups=[RingGroup(ranks=[0, 1], sequences=[SeqSlice(id=0, length=400)]),
                   RingGroup(ranks=[2, 3], sequences=[SeqSlice(id=1, length=400)])]),
        MicroBatch(groups=[RingGroup(ranks=[0], sequences=[SeqSlice(id=2, length=200)]),
                   RingGroup(ranks=[1], sequences=[SeqSlice(id=3, length=200)])])])
    ring_time = COST.at_speed(0.5).seq_time(400, 2,
                                            bandwidth_gbps=CPU4.intra_node_bandwidth_gbps)
    times = {0: [ring_time + COST.c * 2, predicted(plan.micro_batches[1].groups[0])],
             1: [ring_time + COST.c * 2, 2 * predicted(plan.micro_batches[1].groups[1])],
             2: [ring_time + COST.c * 2], 3: [ring_time + COST.c * 2]}
    for _ in range(5):
        est.observe(plan, times)
        speeds = est.update(COST)
    assert speeds[0] == 1.0 and speeds[1] == 0.5
    assert speeds[2] == speeds[3] == 0.5


def test_node_pools_are_nominal_and_only_deviations_are_corrections():
    from scheduler.specs import ClusterSpec

    cpu = cluster_preset("cpu", num_ranks=2).model_dump(exclude={"num_nodes", "pools"})
    cluster = ClusterSpec(pools=[{**cpu, "num_nodes": 1},
                                 {**cpu, "num_nodes": 1, "achieved_tflops": 0.025}])
    cost = CostModel(TINY, cluster)
    est = SpeedEstimator(cluster)
    plan = packed_plan([[100, 300, 200]] * 4)
    times = {r: [cost.at_speed(v).group_seconds_of(
        [_shard(s.length) for s in g.sequences], 1, 1.0) for _, g in plan.micro_batches_of(r)]
        for r, v in enumerate([1.0, 1.0, 0.5, 0.5])}
    est.observe(plan, times)
    assert list(est.update(cost)) == [1.0, 1.0, 0.5, 0.5]
    assert list(est.correction) == [1.0] * 4


def _shard(length: int):
    from scheduler.sharding import Shard

    return Shard(seq_id=0, length=length, ring_size=1, offload_ratio=0.0)


def test_steps_that_load_every_rank_alike_cancel_out():
    # Every other step the whole box is 3x busier (another job): all ranks' times triple,
    # and in those steps rank 0 happens to run four packs, the others one. Rank 2 is truly
    # 2x slow throughout. Without the per-step factor rank 0's samples would come mostly
    # from loaded steps and read it as a straggler; with it, speeds are exact.
    est = SpeedEstimator(CPU4)
    rng = np.random.default_rng(1)
    for step in range(8):
        load = 3.0 if step % 2 else 1.0
        plan = packed_plan([[int(x) for x in rng.integers(50, 400, size=4 if r == 0 and load > 1
                                                           else 1)] for r in range(4)])
        est.observe(plan, measured(plan, {r: load * (2.0 if r == 2 else 1.0)
                                          for r in range(4)}))
        speeds = est.update(COST)
    assert list(speeds) == [1.0, 1.0, 0.5, 1.0]
