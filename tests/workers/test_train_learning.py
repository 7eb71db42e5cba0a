"""Learning through rings: the tiny model learns the copy task on 4 gloo ranks.

Data: scheduler.synth's copy task (a random prefix of ids 1..V-1, then its copy), written
as a token dataset and read by workers.data; every sequence has 32 tokens and every step
puts every sequence on a ring spanning ranks (rings [2, 0] and [3, 1] on even steps,
[1, 3, 0, 2] on odd ones).

Why the threshold means cross-rank attention works. A copied token t = prefix[t - h] is
uniform over V - 1 ids and independent of every other token except its source. With the
zigzag layout (chunk j and 2d-1-j on ring position j; 32 is a multiple of 2d) the query
that predicts it (position t - 1) and the source sit on different ranks for all but a few
predictions (counted exactly below from parallelism.ZigzagLayout). A model that cannot
attend across ranks has no information about those tokens, so its expected CE on them is
at least log(V - 1); the copied-half loss is then at least
    floor = (cross-rank predictions / copied-half predictions) * log(V - 1)  (~2.5 nats).
We evaluate the trained model on fresh sequences *through the same rings* and require the
copied-half loss to be below floor / 4 (~0.63); it reaches ~0.08 in practice. (A model
that attends across ranks cannot beat log(V - 1) on the first half: it is random.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from parallelism import ZigzagLayout, zigzag_shard
from parallelism.worlds import run_distributed
from scheduler.dataset import DatasetWriter
from scheduler.synth import copy_task_tokens
from workers.data import DatasetPlanSource
from workers.model import IGNORE_INDEX
from workers.train import TrainConfig, Trainer, train

from .helpers import group, plan_of, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

VOCAB = 16  # copy-task ids 1..15 (the tiny model's head still covers 256)
LENGTH = 32  # every sequence; a multiple of 2 * 4 so chunks align with the halves
PER_BATCH = 8
STEPS = 240
RINGS = ([[2, 0], [3, 1]], [[1, 3, 0, 2]])  # two rings of 2 on even steps, one of 4 on odd


class AlternatingRingPlanner:
    """Even steps: sequences 0-3 on ring [2, 0], 4-7 on ring [3, 1]; odd steps: all on the
    4-ring [1, 3, 0, 2] (odd orders on purpose). One micro-batch per step keeps it quick."""

    def __init__(self):
        self.calls = 0

    def __call__(self, lengths: np.ndarray):
        assert len(lengths) == PER_BATCH and set(lengths.tolist()) == {LENGTH}, lengths
        self.calls += 1
        seqs = [(i, LENGTH) for i in range(PER_BATCH)]
        if self.calls % 2:
            return plan_of(4, [[group(RINGS[0][0], seqs[:4]), group(RINGS[0][1], seqs[4:])]])
        return plan_of(4, [[group(RINGS[1][0], seqs)]])


def copied_half_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets of one sequence, kept only where the target is a copied token."""
    h = LENGTH - LENGTH // 2
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[h - 1:-1] = tokens[h:]
    return targets


def _eval_copied_half(model, rank: int, sequences: list[torch.Tensor]) -> float:
    """Copied-half CE of fresh sequences, each split over the 4-ring as in training."""
    ring = RINGS[1][0]
    j = ring.index(rank)
    totals = torch.zeros(2, dtype=torch.float64)
    for tokens in sequences:
        cu = torch.tensor([0, LENGTH], dtype=torch.int32)
        ids, cu_local, pos = zigzag_shard(tokens, cu, len(ring), j)
        targets = zigzag_shard(copied_half_targets(tokens), cu, len(ring), j)[0]
        loss_sum, n = model.forward_backward(ids, cu_seqlens=cu_local, position_ids=pos,
                                             targets=targets, ring=ring)
        totals += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def _train_rank(rank: int, world_size: int, data_dir: str) -> tuple[float, float]:
    torch.set_num_threads(1)
    source = DatasetPlanSource(data_dir, tokens_per_batch=PER_BATCH * LENGTH, seed=0,
                               planner=AlternatingRingPlanner(), rank=rank)
    cfg = TrainConfig(lr=3e-3, warmup_steps=20, total_steps=STEPS, weight_decay=0.0)
    trainer = Trainer(tiny_model(seed=0, dtype="float32"), cfg, rank=rank)
    stats = train(trainer, num_steps=STEPS, plan_source=source)
    rng = np.random.default_rng(12345)  # fresh sequences, never trained on
    fresh = [torch.from_numpy(copy_task_tokens(LENGTH, VOCAB, rng).astype(np.int64))
             for _ in range(16)]
    return stats[0].stats.loss, _eval_copied_half(trainer.model, rank, fresh)


def _cross_rank_share() -> float:
    """Share of copied-half predictions whose query and source sit on different ranks."""
    h = LENGTH - LENGTH // 2
    shares = []
    for ring in [*RINGS[0], *RINGS[1]]:
        layout = ZigzagLayout(lengths=(LENGTH,), ring_size=len(ring))
        owner = torch.empty(LENGTH, dtype=torch.int64)
        for j in range(len(ring)):
            owner[layout.global_index(j)] = j
        queries = torch.arange(h - 1, LENGTH - 1)  # predicts token q + 1 = copy of q + 1 - h
        shares.append(float((owner[queries] != owner[queries + 1 - h]).double().mean()))
    return min(shares)


def test_copy_task_is_learned_through_rings(tmp_path):
    rng = np.random.default_rng(7)
    with DatasetWriter(tmp_path / "data" / "data") as w:
        for _ in range(STEPS * PER_BATCH // 2):  # two epochs
            w.add(copy_task_tokens(LENGTH, VOCAB, rng))
    results = run_distributed(_train_rank, 4, str(tmp_path / "data"), timeout_s=400)
    first_loss, copied = results[0]
    assert all(r == results[0] for r in results)  # every rank sees the same global figures
    share = _cross_rank_share()
    floor = share * math.log(VOCAB - 1)
    assert share > 0.9, share
    assert first_loss > 0.9 * math.log(256)  # it starts from chance over the whole vocab
    assert copied < floor / 4, (copied, floor)
