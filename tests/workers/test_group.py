"""workers.group: the Ray worker group runs plans exactly, saves/restores, reports deaths.

One local Ray per module, kept small (no dashboard, 100 MB object store, 4 CPUs). The
exactness check is the invariant's (tests/workers/test_step_invariant.py, which states the
1e-10 tolerance) on fewer plans, now through actors, plus bit-identical resume.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from scheduler.dataset import DatasetWriter
from scheduler.plan import StepPlan
from workers.data import DatasetPlanSource
from workers.group import GroupConfig, WorkerDiedError, WorkerError, WorkerGroup
from workers.train import TrainConfig

from .helpers import (
    group,
    max_rel_err,
    odd_ring_planner,
    plan_of,
    random_samples,
    reference_loss_and_grads,
    tiny_model,
    tiny_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LENGTHS = [23, 5, 9, 1, 17, 7, 2]
PLAN = plan_of(4, [
    [group([3, 0, 2], [(0, 23), (1, 5)]), group([1], [(2, 9), (3, 1)])],
    [group([2, 1], [(4, 17)]), group([0], [(5, 7)])],
    [group([0], [(6, 2)])],
])


def _config(num_ranks: int = 4) -> GroupConfig:
    # fp64: the workers build the model in the precision's compute dtype (not the spec's).
    return GroupConfig(num_ranks=num_ranks, model=tiny_spec(), seed=3, timeout_s=60,
                       train=TrainConfig(lr=1e-2, max_grad_norm=1.0, precision="fp64"))


def _planned_case() -> tuple[list[int], StepPlan]:
    from scheduler import cluster_preset, plan_batch

    lengths = [70, 33, 1, 12, 45, 9, 28]
    return lengths, plan_batch(lengths, cluster_preset("cpu", num_ranks=4), tiny_spec(),
                               capacity_tokens=24, time_limit_s=0.05)


def test_group_step_matches_autograd_and_resumes_bit_identically(local_ray, tmp_path):
    with WorkerGroup(_config()) as g:
        assert len(set(g.pids)) == 4
        for lengths, plan in [(LENGTHS, PLAN), _planned_case()]:
            samples = random_samples(lengths, seed=0)
            want_loss, want_grads = reference_loss_and_grads(tiny_model(seed=3), samples)
            stats = g.run_step(plan, samples)
            assert all(abs(s.loss - want_loss) <= 1e-10 * want_loss for s in stats)
            for grads in g.state("grads"):
                assert max_rel_err(grads, want_grads) <= 1e-10
        # The driver's loop: batches from a token dataset, planned on the driver.
        rng = np.random.default_rng(0)
        with DatasetWriter(tmp_path / "data" / "data") as w:
            for n in rng.integers(2, 60, size=30):
                w.add(rng.integers(0, 256, size=int(n)))
        source = DatasetPlanSource(tmp_path / "data", tokens_per_batch=150, seed=0,
                                   planner=odd_ring_planner, rank=None)
        straight = [s[0].stats.loss for s in g.train(2, source)]
        g.save(tmp_path / "ckpt")
        straight += [s[0].stats.loss for s in g.train(2, source)]
        end = g.state("params")
        assert g.restore(tmp_path / "ckpt") == 2 and g.data_position.index == 2
        again = [s[0].stats.loss for s in g.train(2, source)]
        assert again == straight[2:]
        for a, b in zip(end, g.state("params"), strict=True):
            assert all(torch.equal(a[n], b[n]) for n in a)


def test_dead_actor_is_reported_not_hung(local_ray):
    g = WorkerGroup(_config(num_ranks=2))
    plan = plan_of(2, [[group([1, 0], [(0, 9), (1, 4)])]])
    try:
        ray.kill(g.actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1") as err:
            g.run_step(plan, random_samples([9, 4], seed=0))
        assert err.value.rank == 1
        assert time.monotonic() - start < 30  # well before the 60 s process-group timeout
        with pytest.raises(WorkerError, match="broken"):
            g.run_step(plan, random_samples([9, 4], seed=0))
    finally:
        g.stop()
    g.stop()  # idempotent


def test_rank_error_is_reported_while_the_others_wait_in_the_ring(local_ray):
    # Rank 0 lacks sample 2 and raises before any communication; rank 1 meanwhile blocks
    # in the ring with rank 0 (until the 60 s process-group timeout). The group must
    # report rank 0's error at once rather than wait for rank 1.
    plan = plan_of(2, [[group([1, 0], [(0, 9), (1, 4)])], [group([0], [(2, 3)])]])
    samples = random_samples([9, 4, 3], seed=0)
    del samples[2]
    with WorkerGroup(_config(num_ranks=2)) as g:
        start = time.monotonic()
        with pytest.raises(WorkerError, match="rank 0: ValueError: samples: sequence id 2"):
            g.run_step(plan, samples)
        assert time.monotonic() - start < 30


def test_user_errors_name_the_field():
    with pytest.raises(ValueError, match="num_ranks=0"):
        GroupConfig(num_ranks=0, model=tiny_spec())
    with pytest.raises(ValueError, match="cpus_per_rank=-1"):
        GroupConfig(num_ranks=2, model=tiny_spec(), cpus_per_rank=-1)
