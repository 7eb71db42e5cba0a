"""plan_batch: valid plans for every policy, the shapes the worker tests rely on, errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import InfeasibleBatchError, plan_batch, simulate
from scheduler.specs import cluster_preset, model_preset

TINY = model_preset("tiny")
CPU4 = cluster_preset("cpu", num_ranks=4)
WORKER_BATCH = [200, 150, 90, 40, 30, 7, 5, 3]


@pytest.mark.parametrize("policy", ["hdp", "pow2", "naive", "static"])
def test_every_policy_gives_a_valid_plan_with_predictions(policy):
    plan = plan_batch(WORKER_BATCH, CPU4, TINY, policy=policy, capacity_tokens=64)
    plan.check(WORKER_BATCH)
    assert plan.version == 2 and plan.memory.precision == "fp32"
    assert plan.predicted is not None
    assert len(plan.predicted.per_rank_busy_s) == 4
    assert plan.predicted.makespan_s >= plan.predicted.lower_bound_s > 0
    groups = list(plan.groups())
    assert len(plan.predicted.groups) == len(groups)
    for p, (_, g) in zip(plan.predicted.groups, groups, strict=True):
        assert len(p.flops_per_rank) == len(p.bytes_sent_per_rank) == g.ring_size
        assert min(p.flops_per_rank) > 0 and max(p.peak_bytes_per_rank) <= \
            plan.memory.device_budget_bytes
        assert (max(p.bytes_sent_per_rank) > 0) == (g.ring_size > 1)
    if policy == "pow2":
        assert all(g.ring_size & (g.ring_size - 1) == 0 for _, g in groups)


def test_small_capacity_gives_rings_of_2_3_4_packs_and_uneven_micro_batches():
    # The worker runtime tests need every shape at once: D(200)=4, D(150)=3, D(90)=2 at
    # 64 tokens per rank, packed single ranks, ranks running different numbers of
    # micro-batches. naive keeps every ring at D(s) (hdp may enlarge them to balance);
    # the cpu preset offloads only when a sequence needs it.
    plan = plan_batch(WORKER_BATCH, CPU4, TINY, policy="naive", capacity_tokens=64)
    sizes = {g.ring_size: [s.length for s in g.sequences] for _, g in plan.groups()}
    assert sizes[4] == [200] and sizes[3] == [150] and sizes[2] == [90]
    assert all(s.offload_ratio == 0.0 for _, g in plan.groups() for s in g.sequences)
    assert all(g.memory.scheme == "plain" for _, g in plan.groups())
    packed = [g for _, g in plan.groups() if g.ring_size == 1]
    assert packed and any(len(g.sequences) > 1 for g in packed)
    counts = {len(plan.micro_batches_of(r)) for r in range(4)}
    assert len(counts) > 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=24),
       nodes=st.integers(1, 3), gpn=st.sampled_from([2, 3, 4]), capacity=st.integers(40, 400))
def test_hdp_is_never_slower_than_pow2_dynamic_cp(lengths, nodes, gpn, capacity):
    # Every pow2 plan is an hdp plan: the pow2 policy's own plan, simulated on its own, is
    # the reference hdp must match or beat (the case of WORKER_BATCH: free sizes put 150
    # on a ring of 3, the ring of 4 is faster).
    cluster = cluster_preset("cpu", num_ranks=nodes * gpn, gpus_per_node=gpn)
    args = dict(capacity_tokens=capacity, time_limit_s=0.05, predictions=False)
    hdp = plan_batch(lengths, cluster, TINY, policy="hdp", **args)
    pow2 = plan_batch(lengths, cluster, TINY, policy="pow2", **args)
    assert simulate(hdp, cluster, TINY).makespan_s <= \
        simulate(pow2, cluster, TINY).makespan_s * (1 + 1e-12)


def test_hdp_takes_the_faster_power_of_two_ring_when_free_sizes_lose():
    hdp = plan_batch(WORKER_BATCH, CPU4, TINY, policy="hdp", capacity_tokens=64)
    naive = plan_batch(WORKER_BATCH, CPU4, TINY, policy="naive", capacity_tokens=64)
    rings = {s.length: g.ring_size for _, g in hdp.groups() for s in g.sequences}
    assert rings[200] == rings[150] == 4  # D(150) = 3, but a ring of 4 is faster here
    assert hdp.predicted.makespan_s < naive.predicted.makespan_s


def test_derived_capacity_comes_from_gpu_memory():
    plan = plan_batch([1000, 20, 3], CPU4, TINY)
    # 12 GiB x 0.9 less ~1.3 MB of fp32 model states, over ~10.5 KB of traced fp32
    # activations per token (scheduler/activations.py): about 1.1M tokens.
    assert 1_000_000 < plan.capacity_tokens < 1_200_000
    plan.check([1000, 20, 3])


def test_simulate_matches_predicted():
    plan = plan_batch(WORKER_BATCH, CPU4, TINY, capacity_tokens=64)
    sim = simulate(plan, CPU4, TINY)
    assert sim.makespan_s == pytest.approx(plan.predicted.makespan_s, rel=1e-12)
    assert sim.lower_bound_s == pytest.approx(plan.predicted.lower_bound_s, rel=1e-12)
    assert sim.makespan_s >= sim.lower_bound_s


def test_infeasible_sequence_names_id_length_and_limit():
    # cpu preset: 3 GiB of host per rank over ~8.7 KB per token of offload room.
    with pytest.raises(InfeasibleBatchError) as exc:
        plan_batch([5, 10**9, 7], CPU4, TINY, capacity_tokens=64)
    assert exc.value.seq_id == 1 and exc.value.length == 10**9
    assert 0 < exc.value.max_length < 10**9
    assert "sequence id 1" in str(exc.value)
    assert plan_batch([exc.value.max_length], CPU4, TINY, capacity_tokens=64).check()
    # The controller plans in a process pool: the error must come back whole (an error
    # that cannot unpickle breaks the pool for every job).
    import pickle

    back = pickle.loads(pickle.dumps(exc.value))
    assert (back.seq_id, back.length, back.max_length, str(back)) == (
        1, 10**9, exc.value.max_length, str(exc.value))


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(lengths=[]), "lengths"),
    (dict(lengths=[3, 0, 2]), "lengths[1]=0"),
    (dict(lengths=[3, -4]), "lengths[1]=-4"),
    (dict(policy="megatron"), "policy='megatron'"),
    (dict(capacity_tokens=0), "capacity_tokens=0"),
    (dict(time_limit_s=-1.0), "time_limit_s=-1.0"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(lengths=[5, 6], policy="hdp", capacity_tokens=64, time_limit_s=0.1)
    args.update(kwargs)
    lengths = args.pop("lengths")
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        plan_batch(lengths, CPU4, TINY, **args)


def test_offload_policy_defaults_per_cluster():
    from scheduler.simulator import default_offload

    # h100: 256 GiB of host per rank vs 80 on the device; cpu: one RAM split in two.
    assert default_offload(cluster_preset("h100")) == "auto"
    assert default_offload(CPU4) == "needed"
    # "auto" lets a GPU cluster shrink a ring with MEMO offload; "needed" does not while
    # the sequence fits the ranks plainly (16 ranks x ~4.7K tokens of llama-7b here).
    llama, h100 = model_preset("llama-7b"), cluster_preset("h100", num_ranks=16)
    auto = plan_batch([60_000], h100, llama, time_limit_s=0)
    plain = plan_batch([60_000], h100, llama, time_limit_s=0, offload="needed")
    assert all(g.memory.scheme == "plain" for _, g in plain.groups())
    assert auto.predicted.makespan_s <= plain.predicted.makespan_s * (1 + 1e-9)
    # On 8 ranks it no longer fits plainly: MEMO offload, within the device budget.
    h8 = cluster_preset("h100", num_ranks=8)
    tight = plan_batch([60_000], h8, llama, time_limit_s=0, offload="needed")
    (_, ring), = tight.groups()
    assert ring.memory.scheme == "offload" and ring.ring_size == 8
    assert max(tight.predicted.groups[0].peak_bytes_per_rank) <= \
        tight.memory.device_budget_bytes


def test_static_baseline_is_the_fastest_degree_brute_force():
    # Every CP degree 1..N simulated as a full plan (independent of the sweep's bound and
    # its shortcut), the fastest must be the one the baseline returns.
    from scheduler.cost import CostModel
    from scheduler.planner import build_plan, finish_plan, static_micro_batches
    from scheduler.sharding import shard_batch
    from scheduler.topology import Topology

    cluster = cluster_preset("cpu", num_ranks=6)
    lengths = [400, 130, 90, 77, 40, 33, 31, 20, 9, 5, 3, 2]
    cost = CostModel(TINY, cluster)
    shards = shard_batch(lengths, capacity_tokens=110, world_size=6, cost=cost, offload="needed")
    got = plan_batch(lengths, cluster, TINY, policy="static", capacity_tokens=110, cost=cost)
    p_min = max(sh.ring_size for sh in shards)
    makespans = {}
    for p in range(p_min, 7):
        plan = build_plan(static_micro_batches(shards, cost, Topology(cluster), 110, p), 6, 110,
                          cost)
        makespans[p] = finish_plan(plan, cluster, TINY, cost).predicted.makespan_s
    assert got.predicted.makespan_s == pytest.approx(min(makespans.values()), rel=1e-12)
    assert len(set(makespans)) > 1 and max(g.ring_size for _, g in got.groups()) == \
        min(makespans, key=makespans.get)
