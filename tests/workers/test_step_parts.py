"""Parts of the step: the gradient all-reduce (2 gloo ranks) and the memory-scheme choice."""

from __future__ import annotations

import pytest
import torch

from parallelism import all_reduce_gradients
from parallelism.worlds import run_distributed
from scheduler import plan as plan_module
from scheduler.plan import GroupMemory, RingGroup, SeqSlice
from workers.step import global_num_predictions, memory_scheme

from .helpers import group, plan_of, tiny_spec


def _params(rank: int) -> list[torch.nn.Parameter]:
    """Mixed dtypes and odd sizes; rank 1 leaves one gradient unset (it ran no such layer)."""
    gen = torch.Generator().manual_seed(rank)
    shapes = [((3, 5), torch.float64), ((7,), torch.float32), ((2, 2, 3), torch.float64),
              ((1,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
    for i, p in enumerate(params):
        if not (rank == 1 and i == 2):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return params


def _sync_rank(rank: int, world_size: int, bucket_bytes: int) -> list[torch.Tensor]:
    params = _params(rank)
    all_reduce_gradients(params, bucket_bytes=bucket_bytes)
    return [p.grad for p in params]


@pytest.mark.distributed
def test_all_reduce_sums_every_gradient_across_buckets():
    # Reference: the plain sum of both ranks' gradients (a missing one counts as zero).
    want = [sum((p.grad if p.grad is not None else torch.zeros_like(p)) for p in ps)
            for ps in zip(_params(0), _params(1), strict=True)]
    for got in run_distributed(_sync_rank, 2, 40, timeout_s=60):  # 40 B: several buckets
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # two addends: exact


def test_all_reduce_without_a_process_group_only_fills_missing_gradients():
    params = _params(1)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    all_reduce_gradients(params)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad, torch.zeros_like(p) if b is None else b)
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        all_reduce_gradients(params, bucket_bytes=0)


def test_memory_scheme_is_exactly_the_plans(monkeypatch):
    spec = tiny_spec("float32")
    # Version 2: what the group names, nothing else (no budget, no constant of the step).
    named = RingGroup(ranks=[0], sequences=[SeqSlice(id=0, length=4000)],
                      memory=GroupMemory(scheme="streambp", chunk_tokens=33))
    assert memory_scheme(named, 4000, spec) == {"scheme": "streambp", "offload_ratio": 0.0,
                                                "stream_chunk_size": 33}
    memo = RingGroup(ranks=[2, 0], sequences=[SeqSlice(id=0, length=40)],
                     memory=GroupMemory(scheme="offload", offload_ratio=0.0))
    assert memory_scheme(memo, 20, spec) == {"scheme": "offload", "offload_ratio": 0.0,
                                             "stream_chunk_size": None}
    # Version 1, its rule made explicit by scheduler.plan.group_memory.
    ring = group([2, 0], [(0, 30), (1, 10)], offload=0.5)
    assert memory_scheme(ring, 20, spec) == {"scheme": "offload", "offload_ratio": 0.5,
                                             "stream_chunk_size": None}
    weighted = RingGroup(ranks=[0], sequences=[SeqSlice(id=0, length=30, offload_ratio=0.5),
                                               SeqSlice(id=1, length=10)])
    # Token-weighted: 30 * 0.5 of 40 tokens offloaded, as the plan's memory rule counts.
    assert memory_scheme(weighted, 40, spec)["offload_ratio"] == pytest.approx(15 / 40)
    pack = group([0], [(0, 4000)])
    assert memory_scheme(pack, 4000, spec) == {"scheme": "plain", "offload_ratio": 0.0,
                                               "stream_chunk_size": None}
    monkeypatch.setattr(plan_module, "V1_ACTIVATION_BUDGET_BYTES", 2_000_000)
    chunk = memory_scheme(pack, 4000, spec)["stream_chunk_size"]
    per_token = (8 * 64 + 3 * 128) * 4 * 2  # bytes per token per layer, times 2 layers
    assert chunk is not None and 1 <= chunk < 4000 and chunk * per_token <= 2_000_000


def test_global_predictions_count_every_sequence_once():
    plan = plan_of(4, [[group([3, 0, 2], [(0, 23), (1, 1)]), group([1], [(2, 9)])],
                       [group([2, 1], [(3, 17)])]])
    assert global_num_predictions(plan) == 22 + 0 + 8 + 16
