"""parallelism/worlds.py itself: results come back by rank, failures carry the rank's traceback,
a hung rank is killed at the deadline instead of hanging the suite."""

from __future__ import annotations

import time

import pytest

from parallelism.worlds import DistributedRunError, run_distributed

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank: int, world_size: int, scale: int, *, offset: int) -> tuple:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world_size, float(t) * scale + offset


def _rank_one_fails(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    return rank


def _hangs(rank: int, world_size: int) -> int:
    time.sleep(120)
    return rank


def test_results_come_back_indexed_by_rank():
    out = run_distributed(_sum_of_ranks, 2, 10, offset=1, timeout_s=60)
    assert out == [(r, 2, 11.0) for r in range(2)]


def test_failure_carries_rank_and_traceback():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_rank_one_fails, 2, timeout_s=60)
    text = str(info.value)
    assert "rank 1" in text and "deliberate failure on rank one" in text
    assert "_rank_one_fails" in text  # the traceback, not just the message


def test_hung_rank_is_killed_at_deadline():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"ranks \[0\] did not finish within 5"):
        run_distributed(_hangs, 1, timeout_s=5)
    assert time.monotonic() - start < 40
