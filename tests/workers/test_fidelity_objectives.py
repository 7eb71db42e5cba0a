"""The cost model charges each objective's loss head as the executor runs it.

DPO computes every sequence's log-probability in a first no-grad pass over the head
before its factor-weighted backward (workers/objectives.py), so its head costs 8 h V
matmul FLOPs per token where next-token CE and GRPO cost 6; on a ring its members add
their partial log-probs with `parallelism.ring_sum` (channel "dpo"). Measured here with
`torch.utils.flop_counter.FlopCounterMode` and RingComm's byte counters, against
`scheduler.work.group_flops(objective=)` and `ring_bytes(objective=)`, and the planner's
predictions for a batch with DPO pairs are those figures.

Tolerance: FLOPs within 2% (as tests/workers/test_fidelity.py: the counter and the model
agree on every matmul, the margin covers the kernel's diagonal tiles); bytes exactly.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from parallelism import CommStats, ring_sum, zigzag_shard
from parallelism.worlds import run_distributed
from scheduler import cluster_preset
from scheduler.work import group_flops, head_flops_per_token, ring_bytes
from workers.model import next_token_targets
from workers.objectives import DPO, GRPO

from .helpers import one_thread  # noqa: F401
from .test_fidelity import FLOP_TOL, flop_counter, model_of, packed_batch, spec_of

LENGTHS = [300, 1, 127, 203]
PAIRS = ([0, 3], [2, 1])  # (chosen, rejected) indices; the length-1 sequence has no target


def _dpo(ring_sum_fn=None) -> DPO:
    zeros = torch.zeros(2, dtype=torch.float64)
    return DPO(chosen=torch.tensor(PAIRS[0]), rejected=torch.tensor(PAIRS[1]),
               ref_chosen_logps=zeros, ref_rejected_logps=zeros, beta=0.5,
               ring_sum=ring_sum_fn)


def _grpo() -> GRPO:
    return GRPO(advantages=torch.tensor([1.0, -0.5, 0.3, -0.8], dtype=torch.float64))


@pytest.mark.parametrize("objective", ["pretrain", "dpo", "grpo"])
def test_packed_head_flops_match_the_objective(objective):
    spec = spec_of("float32")
    model = model_of(spec)
    ids, cu = packed_batch(LENGTHS)
    head = {"pretrain": None, "dpo": _dpo(), "grpo": _grpo()}[objective]
    with flop_counter() as counter:
        model.forward_backward(ids, cu_seqlens=cu, objective=head)
    measured = counter.get_total_flops()
    predicted = group_flops(spec, LENGTHS, objective=objective).total
    assert abs(predicted / measured - 1) <= FLOP_TOL, (objective, predicted, measured)


def test_dpo_head_pass_is_a_measured_difference():
    # The extra no-grad pass alone: DPO minus next-token CE on the same batch is 2 h V T.
    spec = spec_of("float32")
    model = model_of(spec)
    ids, cu = packed_batch(LENGTHS)
    counts = {}
    for name, head in (("ce", None), ("dpo", _dpo())):
        with flop_counter() as counter:
            model.forward_backward(ids, cu_seqlens=cu, objective=head)
        counts[name] = counter.get_total_flops()
    extra = head_flops_per_token(spec, "dpo") - head_flops_per_token(spec, "pretrain")
    assert counts["dpo"] - counts["ce"] == extra * sum(LENGTHS)


def _dpo_ring_rank(rank: int, world_size: int, ring: list[int]) -> tuple:
    spec = spec_of("float32")
    model, stats = model_of(spec), CommStats()
    ids, cu = packed_batch(LENGTHS)
    targets = next_token_targets(ids, cu)
    d, j = len(ring), ring.index(rank)
    local, cu_local, pos = zigzag_shard(ids, cu, d, j)
    head = _dpo(partial(ring_sum, ring=ring, channel="dpo", stats=stats))
    with flop_counter() as counter:
        model.forward_backward(local, cu_seqlens=cu_local, position_ids=pos,
                               targets=zigzag_shard(targets, cu, d, j)[0], ring=ring,
                               objective=head, comm_stats=stats)
    return j, counter.get_total_flops(), dict(stats.bytes_sent)


@pytest.mark.distributed
def test_dpo_ring_flops_and_bytes_match_predictions():
    ring = [2, 0, 1]
    spec = spec_of("float32")
    for j, flops, sent in run_distributed(_dpo_ring_rank, 3, ring, timeout_s=240):
        want = group_flops(spec, LENGTHS, ring_size=3, position=j, objective="dpo").total
        assert abs(want / flops - 1) <= FLOP_TOL, (j, want, flops)
        channels = ring_bytes(spec, LENGTHS, ring_size=3, position=j, dtype="float32",
                              objective="dpo").by_channel()
        assert sent == channels, (j, sent, channels)
        assert channels["dpo"] == 2 * 8 * len(LENGTHS)


def test_planner_predicts_the_dpo_head_for_a_batch_with_pairs():
    from scheduler.planner import plan_batch

    spec = spec_of("float32")
    cluster = cluster_preset("cpu", num_ranks=2)
    lengths = [40, 35, 20, 22, 9, 12]
    pairs = [(0, 1), (3, 2), (4, 5)]
    plans = {name: plan_batch(lengths, cluster, spec, capacity_tokens=64, time_limit_s=0.05,
                              pairs=p) for name, p in (("dpo", pairs), ("pretrain", None))}
    for objective, plan in plans.items():
        for (_, g), pred in zip(plan.groups(), plan.predicted.groups, strict=True):
            seqs = [s.length for s in g.sequences]
            want = [group_flops(spec, seqs, ring_size=g.ring_size, position=j,
                                objective=objective).total for j in range(g.ring_size)]
            assert pred.flops_per_rank == want
    # Same groups, the head alone: the dpo plan's prediction exceeds the CE figure of its
    # own groups by the no-grad pass over every token of the batch.
    dpo_plan = plans["dpo"]
    ce_of_dpo_groups = sum(group_flops(spec, [s.length for s in g.sequences],
                                       ring_size=g.ring_size, position=j).total
                           for _, g in dpo_plan.groups() for j in range(g.ring_size))
    dpo_total = sum(sum(p.flops_per_rank) for p in dpo_plan.predicted.groups)
    extra = head_flops_per_token(spec, "dpo") - head_flops_per_token(spec, "pretrain")
    assert dpo_total - ce_of_dpo_groups == extra * sum(lengths)
    assert dpo_plan.pairs == pairs
