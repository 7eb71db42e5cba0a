"""Slow ranks and node pools in the planner: a hand-computed 3-rank example the planner
and the simulator must both reproduce, rings at their slowest member's speed, a slow pool
getting proportionally less work, and a property test over clusters of pools whose ranks
hold different numbers of tokens (every token once, no rank over its own capacity or
device budget)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import CostModel, lower_bound, plan_batch, simulate
from scheduler.errors import InfeasibleBatchError
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.rank_memory import RankMemory
from scheduler.specs import (
    CLUSTER_PRESETS,
    ClusterSpec,
    SpecError,
    cluster_preset,
    model_preset,
    parse_spec,
)
from scheduler.work import PLAIN
from scheduler.zigzag import all_local_tokens

TINY = model_preset("tiny")
CPU = {k: v for k, v in CLUSTER_PRESETS["cpu"].items() if k != "gpus_per_node"}
# 1 MB/s: a ring's exposed KV hand-offs cost more than splitting the work saves.
SLOW_LINKS = {"intra_node_bandwidth_gbps": 1e-3, "inter_node_bandwidth_gbps": 1e-3}


def linear_cost(cluster: ClusterSpec, seconds_per_token: float) -> CostModel:
    """The cost model made linear by hand: every token takes `seconds_per_token` on the
    reference rank, no quadratic term, no fixed cost per group."""
    cost = CostModel(TINY, cluster)
    cost.a, cost.b, cost.c = 0.0, seconds_per_token, 0.0
    return cost


def tokens_of(plan: StepPlan, rank: int) -> int:
    """Tokens `rank` holds over the step (its zigzag share of each ring)."""
    return sum(all_local_tokens([s.length for s in g.sequences], g.ring_size)[
        g.ranks.index(rank)] for _, g in plan.micro_batches_of(rank))


def test_hand_computed_three_ranks_planner_and_simulator_agree():
    # Rank 1 runs at half speed. Links are slow enough that no ring pays. 200 tokens at 1 ms
    # each over a summed speed of 2.5: perfect balance is 80 ms, i.e. 80 tokens on ranks 0
    # and 2 and 40 on rank 1 ({40, 20, 20}, {20, 20}, {40, 20, 20}).
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=3, **{**CPU, **SLOW_LINKS})
    cost = linear_cost(cluster, 1e-3)
    speeds = [1.0, 0.5, 1.0]
    lengths = [40, 40, 20, 20, 20, 20, 20, 20]
    overhead = cost.step_overhead_s(3)  # collectives + AdamW: every plan pays it once
    plan = plan_batch(lengths, cluster, TINY, cost=cost, speeds=speeds, capacity_tokens=1000,
                      time_limit_s=1.0)
    plan.check(lengths)
    assert [tokens_of(plan, r) for r in range(3)] == [80, 40, 80]
    assert plan.predicted.rank_speeds == speeds
    want = 0.080 + overhead
    assert plan.predicted.makespan_s == pytest.approx(want, rel=1e-9)
    assert simulate(plan, cluster, TINY, cost=cost, speeds=speeds).makespan_s == \
        pytest.approx(want, rel=1e-9)
    assert lower_bound(lengths, cluster, TINY, capacity_tokens=1000, cost=cost,
                       speeds=speeds) == pytest.approx(want, rel=1e-9)
    # Speed-blind, the best split is 80/60/60 tokens; rank 1 gets at least 60 (120 ms).
    blind = plan_batch(lengths, cluster, TINY, cost=cost, capacity_tokens=1000,
                       time_limit_s=1.0)
    assert simulate(blind, cluster, TINY, cost=cost, speeds=speeds).makespan_s >= \
        0.120 + overhead - 1e-9


def test_a_ring_runs_at_its_slowest_members_speed():
    # Links fast enough that ring traffic costs nothing measurable: a 100-token sequence on
    # a ring of 2 is 50 ms per member at speed 1, 100 ms with a half-speed member.
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=3, **{**CPU, "intra_node_bandwidth_gbps":
                                                             1e9, "inter_node_bandwidth_gbps":
                                                             1e9})
    cost = linear_cost(cluster, 1e-3)
    plan = StepPlan(world_size=3, capacity_tokens=1000, micro_batches=[MicroBatch(groups=[
        RingGroup(ranks=[0, 1], sequences=[SeqSlice(id=0, length=100)]),
        RingGroup(ranks=[2], sequences=[SeqSlice(id=1, length=30)])])])
    sim = simulate(plan, cluster, TINY, cost=cost, speeds=[1.0, 0.5, 0.75])
    ring, pack = sim.timeline
    assert ring.end_s - ring.start_s == pytest.approx(0.100, rel=1e-6)
    assert pack.end_s - pack.start_s == pytest.approx(0.040, rel=1e-9)


def pools_cluster(slow_tflops: float, *, slow_memory_gib: float | None = None,
                  links: dict | None = None) -> ClusterSpec:
    fast = {**CPU, **(links or {}), "num_nodes": 1, "gpus_per_node": 2, "gpu": "fast"}
    slow = {**fast, "gpu": "slow", "achieved_tflops": slow_tflops}
    if slow_memory_gib is not None:
        slow["gpu_memory_gib"] = slow_memory_gib
    return ClusterSpec(pools=[fast, slow])


def test_the_slow_pool_gets_proportionally_less():
    # Pools of 2 ranks each, the second at half the TFLOP/s; every token 1 ms on a fast
    # rank, no fixed cost, links too slow for rings. 30 sequences of 100 tokens over a
    # summed speed of 3: 10, 10, 5 and 5 of them, 1 s each; speed-blind, 7 or 8 per rank,
    # and a slow rank with 7 takes 1.4 s.
    cluster = pools_cluster(CPU["achieved_tflops"] / 2, links=SLOW_LINKS)
    assert cluster.rank_speeds() == (1.0, 1.0, 0.5, 0.5)
    cost = linear_cost(cluster, 1e-3)
    lengths = [100] * 30
    plan = plan_batch(lengths, cluster, TINY, cost=cost, capacity_tokens=10_000,
                      time_limit_s=1.0)
    plan.check(lengths)
    assert [tokens_of(plan, r) for r in range(4)] == [1000, 1000, 500, 500]
    assert plan.predicted.rank_speeds == [1.0, 1.0, 0.5, 0.5]
    overhead = cost.step_overhead_s(4)
    assert plan.predicted.makespan_s == pytest.approx(1.0 + overhead, rel=1e-9)
    blind = plan_batch(lengths, cluster, TINY, cost=cost, capacity_tokens=10_000,
                       time_limit_s=1.0, speeds=[1.0] * 4)
    assert simulate(blind, cluster, TINY, cost=cost).makespan_s >= 1.4 + overhead - 1e-9


def test_each_pool_packs_to_its_own_capacity():
    # The second pool's devices have half the memory: their capacity (the memory model of
    # that pool, computed here on its own) is smaller. Sequences of just over half the
    # small capacity pack one per micro-batch there and several on the big pool.
    cluster = ClusterSpec(pools=[{**CPU, "gpu": "big", "num_nodes": 1, "gpus_per_node": 2,
                                  "gpu_memory_gib": 0.012},
                                 {**CPU, "gpu": "small", "num_nodes": 1, "gpus_per_node": 2,
                                  "gpu_memory_gib": 0.006}])
    caps = [RankMemory(TINY, ClusterSpec(num_nodes=2, gpus_per_node=2, **{
        **CPU, "gpu_memory_gib": gib}), world_size=4).capacity_tokens(PLAIN)
        for gib in (0.012, 0.006)]
    assert caps[0] > 2 * caps[1] > 0
    lengths = [caps[1] // 2 + 1] * 16
    plan = plan_batch(lengths, cluster, TINY, time_limit_s=0.2)
    plan.check(lengths)
    assert plan.capacity_tokens == caps[1]
    assert plan.rank_capacity_tokens == [caps[0], caps[0], caps[1], caps[1]]
    packs = {r: [g.num_tokens for _, g in plan.micro_batches_of(r)] for r in range(4)}
    assert all(g.ring_size == 1 for _, g in plan.groups())
    assert max(packs[0] + packs[1]) > caps[1]  # the big pool packs past the small capacity
    assert max(packs[2] + packs[3]) <= caps[1]


@st.composite
def pool_clusters(draw):
    gpn = draw(st.sampled_from([1, 2, 3]))
    pools = []
    for i in range(draw(st.integers(1, 3))):
        pools.append({**CPU, "gpu": f"pool{i}", "num_nodes": draw(st.integers(1, 2)),
                      "gpus_per_node": gpn,
                      "gpu_memory_gib": draw(st.sampled_from([0.006, 0.009, 0.012])),
                      "achieved_tflops": draw(st.sampled_from([0.01, 0.025, 0.05]))})
    return ClusterSpec(pools=pools)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=pool_clusters(), lengths=st.lists(st.integers(1, 1500), min_size=1,
                                                  max_size=25),
       policy=st.sampled_from(["hdp", "pow2", "static", "naive"]))
def test_plans_on_node_pools_hold_every_token_once_within_each_ranks_memory(cluster, lengths,
                                                                             policy):
    try:
        plan = plan_batch(lengths, cluster, TINY, policy=policy, time_limit_s=0.05)
    except InfeasibleBatchError as exc:  # a small cluster: the refusal must be honest
        assert lengths[exc.seq_id] == exc.length > exc.max_length
        plan_batch([exc.max_length], cluster, TINY, policy=policy,
                   time_limit_s=0.05).check([exc.max_length])  # what it says fits does
        return
    plan.check(lengths)  # every id exactly once, lengths as given
    memories = [RankMemory(TINY, ClusterSpec(num_nodes=cluster.num_nodes,
                                             gpus_per_node=cluster.gpus_per_node,
                                             **{**CPU, "gpu_memory_gib": p.gpu_memory_gib}),
                           precision="fp32", world_size=cluster.world_size)
                for p in cluster.pools]
    rank_mem = [memories[cluster.pool_of(r)] for r in range(cluster.world_size)]
    for _, g in plan.groups():
        scheme = g.memory.as_scheme()
        held = all_local_tokens([s.length for s in g.sequences], g.ring_size)
        for rank, tokens in zip(g.ranks, held, strict=True):
            mem = rank_mem[rank]
            if scheme.name == "plain":
                assert tokens <= mem.capacity_tokens(PLAIN, ring_size=g.ring_size), (rank, g)
            peak = mem.activations.peak(tokens, scheme, ring_size=g.ring_size).bytes
            assert mem.states.total + peak <= mem.budget_bytes, (rank, g)
    assert simulate(plan, cluster, TINY).makespan_s == pytest.approx(plan.predicted.makespan_s,
                                                                     rel=1e-12)


def test_pools_are_validated_with_the_field_named():
    ok = parse_spec(ClusterSpec, {"pools": [{"preset": "h100", "num_nodes": 2},
                                            {"preset": "a100", "num_nodes": 2}]}, what="cluster")
    assert ok.world_size == 32 and ok.achieved_tflops == 400.0 and ok.heterogeneous
    assert ok.pool_of(15) == 0 and ok.pool_of(16) == 1
    assert ok.rank_speeds()[16] == pytest.approx(125.0 / 400.0)
    assert ClusterSpec.model_validate_json(ok.model_dump_json()) == ok
    for bad, needle in [
        ({"pools": [{"preset": "tpu", "num_nodes": 1}]}, "preset='tpu'"),
        ({"pools": [{"preset": "h100"}]}, "pools[0]: num_nodes"),
        ({"pools": [{"preset": "h100", "num_nodes": 1, "gpu_memory_gib": -1}]},
         "pools[0]: gpu_memory_gib"),
        ({"pools": [{"preset": "h100", "num_nodes": 1},
                    {"preset": "a100", "num_nodes": 1, "gpus_per_node": 4}]}, "gpus_per_node"),
        ({"pools": [{"preset": "h100", "num_nodes": 1}], "achieved_tflops": 1.0},
         "achieved_tflops=1.0"),
        # a figure of the wrong type beside pools (schemathesis found it as a 500)
        ({"pools": [{"preset": "h100", "num_nodes": 1}], "host_memory_gib": []},
         "host_memory_gib=[] is not a number"),
        ({"pools": [{"preset": "h100", "num_nodes": 1}], "num_nodes": True},
         "num_nodes=True is not a number"),
    ]:
        with pytest.raises(SpecError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            parse_spec(ClusterSpec, bad, what="cluster")


@pytest.mark.parametrize("speeds", [[1.0, 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, float("nan"), 1, 1]])
def test_bad_speeds_are_refused(speeds):
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=4, **CPU)
    with pytest.raises(ValueError, match="speeds: expected 4 finite values > 0"):
        plan_batch([10, 20], cluster, TINY, capacity_tokens=100, speeds=speeds)


def test_the_bound_on_pools_holds_for_a_ring_in_the_best_pool():
    # 1.8M tokens need a ring under MEMO offload. The A100 pool's smaller host memory
    # allows less offload per rank than the H100 pool's: a bound built on the smallest
    # pool's figures (rings of >= 2x as many ranks) exceeded a real plan's makespan by 2x.
    llama = model_preset("llama-7b")
    cluster = ClusterSpec(pools=[{"preset": "h100", "num_nodes": 64},
                                 {"preset": "a100", "num_nodes": 64}])
    lengths = [1_800_000] + [8000] * 1000
    plan = plan_batch(lengths, cluster, llama, policy="pow2", time_limit_s=0.05,
                      predictions=False)
    plan.check(lengths)
    bound = lower_bound(lengths, cluster, llama, capacity_tokens=plan.capacity_tokens)
    assert bound <= simulate(plan, cluster, llama).makespan_s
    # Still a bound on the pools' own figures: no lower than the H100-only cluster's
    # (every rank there at least as able).
    h100 = ClusterSpec(pools=[{"preset": "h100", "num_nodes": 128}])
    assert bound >= lower_bound(lengths, h100, llama, capacity_tokens=plan.capacity_tokens,
                                speeds=[1.0] * 1024) - 1e-9


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("lengths", [[3000, 50, 60], [5000]])
def test_a_ring_wider_than_the_fast_class_goes_on_all_ranks(lengths):
    # Two ranks, one at half speed: a sequence that needs both cannot sit in the class of
    # ranks at speed 1 (one rank). That class's "start" is infinite; it must not be
    # chosen (it once was, under the "every ring at D(s)" target, with NaN placement).
    cluster = cluster_preset("cpu", num_ranks=2)
    plan = plan_batch(lengths, cluster, TINY, capacity_tokens=2048, speeds=[1.0, 0.5],
                      time_limit_s=0.05)
    plan.check(lengths)
    (ring,) = [g for _, g in plan.groups() if g.ring_size > 1]
    assert sorted(ring.ranks) == [0, 1]
    assert plan.predicted.makespan_s == pytest.approx(
        simulate(plan, cluster, TINY, speeds=[1.0, 0.5]).makespan_s, rel=1e-12)
