"""The invariant (docs/architecture.md, "The invariant"): for ANY StepPlan, 4 gloo ranks running
`run_step` give the loss and gradient of one process running plain autograd on the whole
batch (sum of next-token CE over every prediction / number of predictions).

Plans: from `scheduler.plan_batch` with a small capacity, all three policies (rings of 2,
3 and 4 ranks, packs, ranks running different numbers of micro-batches; the test asserts
this coverage), and
hand-written ones with rings in odd order ([3, 0, 2], [1, 3, 0, 2]), sequences shorter than
2 x ring size (empty zigzag chunks), a length-1 sequence, an idle rank, planned offload,
and version-2 plans naming layer-wise StreamBP (1-token chunks) and MEMO offload at
alpha 0 (full recompute) for their groups.

Tolerance: float64 everywhere; the step sums the same terms in another order (per-shard
partial sums, LSE merges of ring blocks, the all-reduce), which moves results by a few
ulps, ~1e-15 relative. 1e-10 leaves room for that, while any missing, duplicated or
mis-scaled prediction changes the loss by >= 1/N ~ 1e-3. Across ranks gradients must be
bit-identical (every rank must step the same weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from parallelism.worlds import run_distributed
from scheduler import cluster_preset
from scheduler.plan import GroupMemory, StepPlan
from workers.data import sequence_ids_of_rank
from workers.step import run_step

from .helpers import (
    as_v2,
    group,
    max_rel_err,
    plan_of,
    random_samples,
    reference_loss_and_grads,
    tiny_model,
    tiny_spec,
)

WORLD = 4
MODEL_SEED = 11
REL_TOL = 1e-10


def _planned_cases() -> list[tuple[list[int], StepPlan, bool]]:
    from scheduler import plan_batch  # here: the spawned ranks need not import OR-tools

    rng = np.random.default_rng(2026)
    cluster = cluster_preset("cpu", num_ranks=WORLD)
    cases = []
    for seed, policy in enumerate(["hdp", "hdp", "hdp", "naive", "static"]):
        lengths = [int(n) for n in rng.integers(1, 60, size=9)] + [int(rng.integers(70, 125))]
        plan = plan_batch(lengths, cluster, tiny_spec(), policy=policy, capacity_tokens=32,
                          time_limit_s=0.05, seed=seed)
        cases.append((lengths, plan, False))
    return cases


def _hand_written_cases() -> list[tuple[list[int], StepPlan, bool]]:
    odd = plan_of(WORLD, [
        [group([3, 0, 2], [(0, 23), (1, 5)]), group([1], [(2, 9), (3, 1)])],
        [group([2, 1], [(4, 17)]), group([0], [(5, 7)])],
        [group([0], [(6, 2)])],
    ])
    tiny_rings = plan_of(WORLD, [
        [group([1, 3, 0, 2], [(0, 3)]), ],
        [group([1, 3, 0, 2], [(1, 10)], offload=0.5)],
        [group([3, 1], [(2, 1), (5, 4)]), group([0], [(3, 12)], offload=0.25),
         group([2], [(4, 6)])],
    ])
    idle_rank = plan_of(WORLD, [[group([0, 3], [(0, 31)]), group([1], [(1, 4)])]])
    # Format version 2: packs under layer-wise StreamBP in 1-token chunks (every query
    # its own chunk), rings under MEMO offload at alpha 0 (full recompute) and plain.
    streamed = as_v2(odd, tiny_spec(), packed=GroupMemory(scheme="streambp", chunk_tokens=1))
    recomputed = as_v2(tiny_rings, tiny_spec())
    for mb in recomputed.micro_batches:
        for g in mb.groups:
            if g.ring_size > 1 and g.memory.scheme == "plain" and g.num_tokens > 3:
                g.memory = GroupMemory(scheme="offload", offload_ratio=0.0)
    return [([23, 5, 9, 1, 17, 7, 2], odd, False),
            ([3, 10, 1, 12, 6, 4], tiny_rings, False),
            ([31, 4], idle_rank, False),
            ([23, 5, 9, 1, 17, 7, 2], streamed, True),
            ([3, 10, 1, 12, 6, 4], recomputed, False)]


def _rank_fn(rank: int, world_size: int, cases: list[tuple[list[int], str, bool]]):
    """Run every case; rank 0 returns (loss, grads), others their gradient's distance to it."""
    torch.set_num_threads(1)
    out = []
    for lengths, plan_json, _ in cases:
        plan = StepPlan.model_validate_json(plan_json)
        model = tiny_model(seed=MODEL_SEED)
        everything = random_samples(lengths, seed=len(lengths))
        mine = {i: everything[i] for i in sequence_ids_of_rank(plan, rank)}
        stats = run_step(model, plan, mine, rank=rank)
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        first = flat.clone()
        dist.broadcast(first, src=0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append((stats.loss, grads if rank == 0 else None, bool(torch.equal(flat, first)),
                    stats.num_predictions, len(stats.micro_batch_times_s)))
    return out


def _coverage(cases) -> tuple[set[int], bool]:
    sizes = {len(g.ranks) for _, plan, _ in cases for _, g in plan.groups()}
    uneven = any(len({len(plan.micro_batches_of(r)) for r in range(WORLD)}) > 1
                 for _, plan, _ in cases)
    return sizes, uneven


@pytest.mark.distributed
def test_run_step_equals_single_process_autograd_for_any_plan():
    cases = _planned_cases() + _hand_written_cases()
    sizes, uneven = _coverage(cases)
    assert {1, 2, 3, 4} <= sizes and uneven, (sizes, uneven)
    results = run_distributed(_rank_fn, WORLD,
                              [(lengths, plan.model_dump_json(), s) for lengths, plan, s in cases],
                              timeout_s=150)
    for c, (lengths, plan, _) in enumerate(cases):
        want_loss, want_grads = reference_loss_and_grads(
            tiny_model(seed=MODEL_SEED), random_samples(lengths, seed=len(lengths)))
        loss, grads, _, num_predictions, _ = results[0][c]
        assert num_predictions == sum(n - 1 for n in lengths)
        assert abs(loss - want_loss) <= REL_TOL * abs(want_loss), (c, loss, want_loss)
        assert max_rel_err(grads, want_grads) <= REL_TOL, (c, plan.model_dump_json())
        for rank in range(WORLD):
            r_loss, _, same_grad, _, num_micro = results[rank][c]
            assert same_grad, f"case {c}: rank {rank}'s gradient differs from rank 0's"
            assert r_loss == loss
            assert num_micro == len(plan.micro_batches_of(rank))
