"""Elastic worlds at the worker-group level: lost ranks cost a step, not a restart.

One elastic WorkerGroup of 4 Ray actors (gloo, fp64, the distributed optimizer with shard
mirrors) is driven through every kind of world change by RINGMASTER_FAULT drills, and its
training is compared with one process running plain autograd and torch.optim.AdamW on
the same batches:

    steps 0-1   4 ranks
    step 2      rank 1 SIGKILLs itself after its first micro-batch (a ring with ranks 2 and
                0); rank 3 is then blocked in a ring with it: the survivors abandon the
                step, form a world of 3 and rerun step 2 on a 3-rank plan
    steps 2-3   3 ranks; then rank 1's restarted actor rejoins
    step 4      4 ranks
    step 5      ranks 0 and 2 die at once (not adjacent: their shards' mirrors survive)
    steps 5-6   2 ranks; ranks 0 and 2 rejoin, and rank 1 dies while they join (after the
                new process group formed): the world falls back to rank 3 alone, whose
                mirror holds rank 1's shard
    step 7      1 rank; everyone rejoins
    step 8      4 ranks
    step 9      ranks 1 and 2 die at once: rank 1's shard and its mirror (on rank 2) are
                both gone, and forming the world says so (the controller then restarts)

Tolerance: the losses and final parameters equal the single-process run within 1e-10
(float64). Every world computes the exact full-batch gradient (only the order of the
float64 sums differs, ~1e-16 relative) and the optimizer state moves bit for bit, so the
runs differ by rounding amplified by AdamW's m / (sqrt(v) + eps), up to lr / eps = 1e6 for
an element whose gradient is near eps. On these batches an uninterrupted 4-rank run ends
1.2e-12 from the reference after 9 steps (a 1-rank run 8e-13); a misplaced or stale shard
would move weights by ~lr = 1e-2. (Batches with an element whose gradient sits near eps
reach ~1e-9 in every world, one rank included: a property of AdamW, not of recovery.)

The pure parts (transfer plans, state intervals, fault specs) are tested without Ray.
"""

from __future__ import annotations

import pytest
import torch

from scheduler.batching import BatchPosition
from workers.faults import fault_at, positional_stall, slow_factor
from workers.group import GroupConfig, WorkerDiedError, WorkerError, WorkerGroup
from workers.optim import StateInterval, state_intervals
from workers.reshard import plan_transfers
from workers.train import TrainConfig

from .helpers import group, plan_of, random_samples, tiny_spec, torch_adamw_run

LENGTHS = [27, 13, 7, 1, 19, 9]
CONFIG = dict(lr=1e-2, warmup_steps=1, total_steps=10, max_grad_norm=0.5, weight_decay=0.1)
FAULTS = ",".join([  # world=E: the world epoch the step runs in (see the timeline)
    "kill:rank=1:step=2:after=1",
    "kill:rank=0:step=5:world=2:after=1", "kill:rank=2:step=5:world=2:after=2",
    "kill:rank=1:at=join:life=2",
    "kill:rank=1:step=9:world=6:after=1:life=2", "kill:rank=2:step=9:world=6:after=1:life=2"])


def batch(step: int) -> dict[int, torch.Tensor]:
    return random_samples(LENGTHS, seed=100 + step)


def plan(world: int):
    """Rings in every world, so that a rank killed mid-step leaves peers blocked on it."""
    s = [(i, n) for i, n in enumerate(LENGTHS)]
    if world == 4:
        return plan_of(4, [[group([2, 0, 1], s[:1]), group([3], s[3:4])],
                           [group([3, 1], s[1:2]), group([0], s[2:3]), group([2], s[4:5])],
                           [group([0, 2], s[5:6])]])
    if world == 3:
        return plan_of(3, [[group([2, 0], s[:1]), group([1], s[1:2])],
                           [group([0], s[2:4]), group([1, 2], s[4:5])], [group([0], s[5:])]])
    if world == 2:
        return plan_of(2, [[group([1, 0], s[:1])], [group([0], s[1:4]), group([1], s[4:])]])
    return plan_of(1, [[group([0], s[:3])], [group([0], s[3:])]])


def reference(num_steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process: plain autograd on the whole batch, clip_grad_norm_, torch AdamW."""
    params, losses, _ = torch_adamw_run(CONFIG, batch, num_steps)
    return params, losses


def _step(g: WorkerGroup, step: int) -> float | None:
    """One step on the group's current world; None if a rank died in it."""
    try:
        out = g.train_step(plan(g.world.size), batch(step),
                           next_position=BatchPosition(index=step + 1))
    except WorkerDiedError:
        return None
    return out[0].stats.loss


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_lost_ranks_cost_a_step_and_the_run_equals_one_process(local_ray):
    config = GroupConfig(num_ranks=4, model=tiny_spec(), seed=0, timeout_s=60,
                         max_actor_restarts=3, env={"RINGMASTER_FAULT": FAULTS},
                         train=TrainConfig(**CONFIG, precision="fp64", shard_mirror=True,
                                           optimizer_sharding="distributed"))
    losses, worlds, dropped = {}, [], []
    with WorkerGroup(config) as g:
        for step in range(9):
            loss = _step(g, step)
            while loss is None:  # a rank died: the survivors form a world, rerun the step
                dropped += [r.dropped_step for r in g.regroup()[:1]]
                loss = _step(g, step)
            losses[step] = loss
            worlds.append(g.world.members)
            if step in (3, 6, 7):
                try:
                    g.rejoin()
                except WorkerDiedError as exc:  # rank 1 died while 0 and 2 joined
                    assert step == 6 and exc.ranks == (1,)
                    g.regroup()
                    assert g.world.members == (3,) and g.world.epoch == 5
        params = g.state("params")
        assert g.data_position == BatchPosition(index=9)
        with pytest.raises(WorkerDiedError):
            g.train_step(plan(4), batch(9), next_position=BatchPosition(index=10))
        with pytest.raises(WorkerError, match="shard and its mirror are both lost"):
            g.regroup()
    assert worlds == [(0, 1, 2, 3)] * 2 + [(0, 2, 3)] * 2 + [(0, 1, 2, 3)] + [(1, 3)] * 2 \
        + [(3,)] + [(0, 1, 2, 3)]
    assert dropped == [2, 5]  # the interrupted steps were dropped everywhere and rerun
    want_params, want_losses = reference(9)
    assert [losses[s] for s in range(9)] == pytest.approx(want_losses, rel=1e-10, abs=0)
    for rank_params in params:
        err = max(float((rank_params[n] - want_params[n]).abs().max()) for n in want_params)
        assert err <= 1e-10
    moved = max(float((want_params[n] - reference(0)[0][n]).abs().max()) for n in want_params)
    assert moved > 1e-3  # the weights really moved, so 1e-10 is a real bound


# ----------------------------------------------------------------- without Ray
def test_transfer_plans_cover_every_needed_element_from_live_holders():
    numels = [10, 7, 1, 12]  # 30 elements: shards of 8 on 4 ranks, of 10 on 3
    old = {q: state_intervals(numels, sharding="distributed", world_size=4, rank=q,
                              shard_mirror=True) for q in range(4)}
    assert old[1] == [StateInterval(lo=8, hi=16, part="own", offset=0),
                      StateInterval(lo=0, hi=8, part="mirror", offset=0)]
    # Old rank 2 is lost; the others are new ranks 0, 1, 2 (old 0, 1, 3).
    holds = {0: old[0], 1: old[1], 2: old[3]}
    needs = {p: state_intervals(numels, sharding="distributed", world_size=3, rank=p,
                                shard_mirror=True) for p in range(3)}
    transfers, missing = plan_transfers(needs, holds)
    assert missing == []
    for p, intervals in needs.items():  # every element of every need covered exactly once
        for need in intervals:
            got = sorted((t.lo, t.hi) for t in transfers if t.dst == p and t.dst_part ==
                         need.part and need.lo <= t.lo < need.hi)
            assert got[0][0] == need.lo and got[-1][1] == need.hi
            assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
    # Lost rank 2's shard [16, 24) comes from its mirror on old rank 3 (new rank 2).
    lost = [t for t in transfers if t.lo >= 16 and t.hi <= 24]
    assert lost and all(t.src == 2 and t.src_part == "mirror" for t in lost)
    # A rank that already holds what it needs copies it locally.
    assert any(t.src == t.dst == 0 and t.lo == 0 for t in transfers)
    # Without mirrors, the lost shard is missing (it comes back from a checkpoint).
    bare = {p: [i for i in h if i.part == "own"] for p, h in holds.items()}
    needs_bare = {p: [i for i in n if i.part == "own"] for p, n in needs.items()}
    _, missing = plan_transfers(needs_bare, bare)
    assert sorted((m.lo, m.hi) for m in missing) == [(16, 20), (20, 24)]


def test_zero1_intervals_follow_whole_tensors():
    numels = [10, 7, 1, 12]
    got = [state_intervals(numels, sharding="zero1", world_size=2, rank=r) for r in range(2)]
    # Largest first onto the least-loaded rank: 12 -> 0, 10 -> 1, 7 -> 1, 1 -> 0.
    assert [(i.lo, i.hi) for i in got[0]] == [(17, 30)]  # adjacent ones merge
    assert sorted((i.lo, i.hi) for i in got[1]) == [(0, 17)]
    everything = state_intervals(numels, sharding="none", world_size=3, rank=2)
    assert everything == [StateInterval(lo=0, hi=30, part="own", offset=0)]


def test_fault_specs(monkeypatch):
    monkeypatch.setenv("RINGMASTER_FAULT", "stall:job=a:rank=1:step=3:stall_s=2.5,"
                                           "kill:rank=0:at=join:life=2")
    f = fault_at(job_id="a-123", attempt=1, slot=1, step=3)
    assert f is not None and (f.kind, f.stall_s) == ("stall", 2.5)
    assert fault_at(job_id="b-123", attempt=1, slot=1, step=3) is None
    assert fault_at(job_id="a-123", attempt=2, slot=1, step=3) is None
    assert fault_at(job_id="x", attempt=1, slot=0, step=None, at="join") is None  # life 1
    assert fault_at(job_id="x", attempt=1, slot=0, step=None, at="join", life=2).kind == "kill"


def test_one_fault_grammar_for_every_drill(monkeypatch):
    # Positional stalls and slow ranks are not start-of-step faults (parallelism.progress
    # acts them out); a malformed spec names itself.
    monkeypatch.setenv("RINGMASTER_FAULT", "stall:rank=1:step=2:micro_batch=0:layer=1,"
                                           "slow:rank=0:factor=2:step=1")
    assert fault_at(job_id="j-1", attempt=1, slot=1, step=2) is None
    assert fault_at(job_id="j-1", attempt=1, slot=0, step=1) is None
    assert positional_stall(job_id="j-1", attempt=1, slot=1) is not None
    assert positional_stall(job_id="j-1", attempt=1, slot=0) is None
    assert slow_factor(job_id="j-1", attempt=3, slot=0, step=1) == 2.0  # every attempt
    assert slow_factor(job_id="j-1", attempt=1, slot=0, step=0) == 1.0
    monkeypatch.setenv("RINGMASTER_FAULT", "explode:rank=1")
    with pytest.raises(ValueError, match="'explode:rank=1' is not KIND"):
        fault_at(job_id="j-1", attempt=1, slot=1, step=0)
