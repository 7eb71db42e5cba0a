"""Hang localisation against positions written by hand: who waits on whom follows from the
plan, and only the rank everyone waits on is blamed (the end-to-end drill with real ranks
is tests/controller/test_stragglers.py)."""

from __future__ import annotations

from controller.hang import RankPosition, localise
from scheduler.plan import MicroBatch, RingGroup, SeqSlice, StepPlan


def plan_of(world: int, micro_batches: list[list[list[int]]]) -> StepPlan:
    ids = iter(range(1000))
    return StepPlan(world_size=world, capacity_tokens=100, micro_batches=[
        MicroBatch(groups=[RingGroup(ranks=g, sequences=[SeqSlice(id=next(ids), length=8)])
                           for g in mb]) for mb in micro_batches])


# mb0: ring [2, 0, 1] and rank 3 packed; mb1: every rank packed.
RING3 = plan_of(4, [[[2, 0, 1], [3]], [[0], [1], [2], [3]]])


def at(rank, **kw) -> RankPosition:
    return RankPosition(rank=rank, **{"step": 5, **kw})


def test_the_stalled_ring_member_is_named_and_the_packed_rank_is_not_blamed():
    pos = {0: at(0, micro_batch=0, ring=(2, 0, 1), layer=1, phase="backward", ring_hop=0,
                 waiting=True),
           1: at(1, micro_batch=0, ring=(2, 0, 1), layer=1, phase="backward"),  # computing
           2: at(2, micro_batch=0, ring=(2, 0, 1), layer=1, phase="backward", ring_hop=1,
                 waiting=True),
           3: at(3, phase="reduce")}
    report = localise(RING3, pos, 4)
    assert report.culprit_ranks == (1,)
    (c,) = report.culprits
    assert c.ring_waiters == (0, 2) and c.collective_waiters == (3,)
    assert report.message == ("rank 1 stalled in micro-batch 0, ring [2, 0, 1], layer 1 "
                              "backward; ranks 0 and 2 wait on it; rank 3 waits in the "
                              "step's collectives")


def test_a_rank_that_never_started_its_micro_batches_is_the_culprit():
    pos = {0: at(0, micro_batch=0, ring=(2, 0, 1), layer=0, phase="forward", ring_hop=0,
                 waiting=True),
           1: at(1, phase="start"),
           2: at(2, micro_batch=0, ring=(2, 0, 1), layer=0, phase="forward", ring_hop=0,
                 waiting=True),
           3: at(3, phase="reduce")}
    report = localise(RING3, pos, 4)
    assert report.culprit_ranks == (1,)
    assert report.message.startswith("rank 1 stalled at the start of step 5, before its first "
                                     "micro-batch; ranks 0 and 2 wait on it in micro-batch 0, "
                                     "ring [2, 0, 1]")


def test_a_member_behind_in_an_earlier_micro_batch_is_blamed():
    # mb0: rank 1 packed (slow, still computing); mb1: ring [0, 1] waits for it.
    plan = plan_of(3, [[[1], [0], [2]], [[0, 1], [2]]])
    pos = {0: at(0, micro_batch=1, ring=(0, 1), layer=0, phase="forward", ring_hop=0,
                 waiting=True),
           1: at(1, micro_batch=0, ring=(1,), layer=1, phase="backward"),
           2: at(2, phase="optimizer")}
    report = localise(plan, pos, 3)
    assert report.culprit_ranks == (1,)
    assert "rank 1 stalled in micro-batch 0, packed, layer 1 backward; rank 0 waits" in \
        report.message
    assert "in micro-batch 1, ring [0, 1]" in report.message


def test_a_ring_whose_members_all_wait_together_is_a_communication_hang():
    pos = {r: at(r, micro_batch=0, ring=(2, 0, 1), layer=1, phase="forward", ring_hop=1,
                 waiting=True) for r in (0, 1, 2)}
    pos[3] = at(3, phase="reduce")
    report = localise(RING3, pos, 4)
    assert report.stuck_rings == ((2, 0, 1),)
    assert "ring [2, 0, 1] is stuck in micro-batch 0, layer 1 forward, ring hop 1" in \
        report.message


def test_a_silent_rank_and_a_rank_without_a_position():
    pos = {0: at(0, micro_batch=0, ring=(2, 0, 1), layer=0, phase="forward", ring_hop=0,
                 waiting=True),
           1: at(1, micro_batch=0, ring=(2, 0, 1), layer=0, phase="forward", ring_hop=0,
                 waiting=True),
           3: at(3, phase="reduce")}
    # rank 2 never sent a position: it has not begun the step
    assert localise(RING3, pos, 4).culprit_ranks == (2,)
    pos[2] = at(2, micro_batch=0, ring=(2, 0, 1), layer=0, phase="forward", ring_hop=0,
                waiting=True)
    # its heartbeats stopped: whatever it said last, nobody can be waiting on it but it
    assert localise(RING3, pos, 4, silent={2}).culprit_ranks == (2,)
