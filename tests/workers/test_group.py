"""workers.group: the Ray worker group runs plans exactly, saves/restores, reports deaths.

One local Ray per module, kept small (no dashboard, 100 MB object store, 4 CPUs). The
exactness check is the invariant's (tests/workers/test_step_invariant.py, which states the
1e-10 tolerance) on fewer plans, now through actors, plus bit-identical resume.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from workers.group import GroupConfig, WorkerDiedError, WorkerError, WorkerGroup
from workers.train import TrainConfig

from .helpers import (
    group,
    max_rel_err,
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


@pytest.fixture(scope="module")
def local_ray():
    ray.init(include_dashboard=False, object_store_memory=100_000_000, num_cpus=4,
             log_to_driver=False)
    yield
    ray.shutdown()


def _config(**kw) -> GroupConfig:
    return GroupConfig(num_ranks=4, model=tiny_spec(), seed=3, timeout_s=60,
                       train=TrainConfig(lr=1e-2, max_grad_norm=1.0), **kw)


def test_group_step_matches_autograd_and_resumes_bit_identically(local_ray, tmp_path):
    samples = random_samples(LENGTHS, seed=0)
    want_loss, want_grads = reference_loss_and_grads(tiny_model(seed=3), samples)
    with WorkerGroup(_config()) as g:
        assert len(set(g.pids)) == 4
        stats = g.run_step(PLAN, samples)
        assert all(abs(s.loss - want_loss) <= 1e-10 * want_loss for s in stats)
        for grads in g.state("grads"):
            assert max_rel_err(grads, want_grads) <= 1e-10
        batches = [random_samples(LENGTHS, seed=k) for k in range(4)]
        straight = [g.train_step(PLAN, b)[0].stats.loss for b in batches[:2]]
        g.save(tmp_path / "ckpt")
        straight += [g.train_step(PLAN, b)[0].stats.loss for b in batches[2:]]
        end = g.state("params")
        assert g.restore(tmp_path / "ckpt") == 2
        again = [g.train_step(PLAN, b)[0].stats.loss for b in batches[2:]]
        assert again == straight[2:]
        for a, b in zip(end, g.state("params"), strict=True):
            assert all(torch.equal(a[n], b[n]) for n in a)


def test_dead_actor_is_reported_not_hung(local_ray):
    g = WorkerGroup(_config())
    try:
        ray.kill(g.actors[2], no_restart=True)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 2") as err:
            g.run_step(PLAN, random_samples(LENGTHS, seed=0))
        assert err.value.rank == 2
        assert time.monotonic() - start < 30  # well before the 60 s process-group timeout
        with pytest.raises(WorkerError, match="broken"):
            g.run_step(PLAN, random_samples(LENGTHS, seed=0))
    finally:
        g.stop()
    g.stop()  # idempotent


def test_user_errors_name_the_field(local_ray):
    with pytest.raises(ValueError, match="num_ranks=0"):
        GroupConfig(num_ranks=0, model=tiny_spec())
    with pytest.raises(ValueError, match="cpus_per_rank=-1"):
        GroupConfig(num_ranks=2, model=tiny_spec(), cpus_per_rank=-1)
