"""DPO pairs in the planner: both sequences of every pair in one group, for every policy,
packed or on a ring, and a plan that splits a pair is refused by plan validation."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import cluster_preset, plan_batch
from scheduler.errors import PlanValidationError
from scheduler.pairs import InfeasiblePairError, unit_length
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan
from scheduler.specs import model_preset
from scheduler.zigzag import max_local_tokens

CAPACITY = 32


def _group_of(plan: StepPlan) -> dict[int, tuple[int, int]]:
    return {s.id: (m, gi) for m, mb in enumerate(plan.micro_batches)
            for gi, g in enumerate(mb.groups) for s in g.sequences}


@pytest.mark.parametrize("policy", ["hdp", "pow2", "naive", "static"])
def test_every_pair_runs_in_one_group(policy):
    rng = np.random.default_rng(7)
    cluster, model = cluster_preset("cpu", num_ranks=4), model_preset("tiny")
    for trial in range(3):
        lengths = [int(x) for x in rng.integers(1, 40, size=14)]
        lengths[0], lengths[1] = 60, 45  # a pair that needs a ring of its own
        order = [int(i) for i in rng.permutation(np.arange(2, 14))]
        pairs = [(1, 0)] + [(order[k], order[k + 1]) for k in range(0, 8, 2)]
        plan = plan_batch(lengths, cluster, model, policy=policy, capacity_tokens=CAPACITY,
                          time_limit_s=0.05, seed=trial, pairs=pairs)
        plan.check(lengths, pairs)  # the format's rules, the memory rule and the pairs
        where = _group_of(plan)
        assert sorted(plan.pairs) == sorted(pairs)
        assert all(where[a] == where[b] for a, b in pairs), (policy, pairs)
        ring = next(g for _, g in plan.groups() if 0 in {s.id for s in g.sequences})
        assert ring.ring_size > 1  # 105 tokens do not fit one rank's 32


def test_a_plan_that_splits_a_pair_is_refused():
    def g(ranks, ids):
        return RingGroup(ranks=ranks, sequences=[SeqSlice(id=i, length=5) for i in ids])

    across_groups = StepPlan(world_size=2, capacity_tokens=64, micro_batches=[
        MicroBatch(groups=[g([0], [0, 2]), g([1], [1, 3])])])
    across_micro_batches = StepPlan(world_size=2, capacity_tokens=64, micro_batches=[
        MicroBatch(groups=[g([0, 1], [0, 2, 3])]), MicroBatch(groups=[g([1, 0], [1])])])
    for plan in (across_groups, across_micro_batches):
        with pytest.raises(PlanValidationError, match=r"batch pair \(0, 1\): split across"):
            plan.check(pairs=[(0, 1)])
        plan.check(pairs=[(2, 3)] if plan is across_micro_batches else None)
        listed = plan.model_copy(update={"pairs": [(0, 1)]})
        assert any("pairs (0, 1): split across" in v for v in listed.violations())
    together = StepPlan(world_size=2, capacity_tokens=64, pairs=[(0, 1)], micro_batches=[
        MicroBatch(groups=[g([1, 0], [0, 1])]), MicroBatch(groups=[g([0], [2, 3])])])
    assert StepPlan.model_validate_json(together.model_dump_json()).check().pairs == [(0, 1)]


def test_a_pair_too_long_for_the_cluster_names_both_sequences():
    with pytest.raises(InfeasiblePairError, match=r"DPO pair \(chosen id 3, rejected id 1\) "
                                                  r"of 90000000 \+ 80000000 tokens"):
        plan_batch([10, 80_000_000, 10, 90_000_000], cluster_preset("cpu", num_ranks=2),
                   model_preset("tiny"), capacity_tokens=32, pairs=[(3, 1)])


def test_unit_length_keeps_the_real_sequences_within_capacity():
    """On every ring the planner may give a unit, each member holds at most capacity of the
    pair's two real sequences (zigzag's uneven chunks counted exactly)."""
    for capacity in (3, 4, 7, 16):
        for l1 in range(1, 3 * capacity):
            for l2 in range(1, 3 * capacity):
                unit = unit_length(l1, l2, capacity)
                lo = max(1, -(-unit // capacity))  # the smallest ring the planner allows
                for d in range(lo, lo + 6):
                    assert max_local_tokens([l1, l2], d) <= capacity, (capacity, l1, l2, d)
                if l1 + l2 <= capacity:
                    assert unit == l1 + l2
