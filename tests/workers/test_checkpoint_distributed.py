"""Bit-identical resume on 4 gloo ranks with rings: N steps straight == k steps, DCP save,
a fresh trainer (other initial weights, other RNG) restored, N - k steps.

Data come from a token dataset through workers.data.DatasetPlanSource with a small
deterministic planner (the two longest sequences on rings [1, 3] and [2, 0], the rest
packed round-robin in a second micro-batch), so both runs see the same plans. float32 so
that any difference in order of operations would show.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scheduler.dataset import DatasetWriter
from tests.dist import run_distributed
from workers.data import DatasetPlanSource
from workers.train import TrainConfig, Trainer, train

from .helpers import group, plan_of, tiny_model

pytestmark = pytest.mark.distributed

TOTAL, K = 4, 2


def _planner(lengths: np.ndarray):
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    seqs = [(i, int(lengths[i])) for i in order]
    rings = [group([1, 3], seqs[:1]), group([2, 0], seqs[1:2])]
    packs = [group([r], seqs[2 + r::4]) for r in range(4) if seqs[2 + r::4]]
    return plan_of(4, [rings, packs] if packs else [rings])


def _run(rank: int, world_size: int, data_dir: str, ckpt_dir: str) -> dict:
    torch.set_num_threads(1)
    cfg = TrainConfig(lr=2e-3, warmup_steps=1, total_steps=TOTAL, max_grad_norm=0.5)

    ring_sizes: list[int] = []

    def source():
        inner = DatasetPlanSource(data_dir, tokens_per_batch=300, seed=1, planner=_planner,
                                  rank=rank)

        def tracked(position):
            inp = inner(position)
            ring_sizes.extend(len(g.ranks) for _, g in inp.plan.groups())
            return inp
        return tracked

    straight = Trainer(tiny_model(seed=0, dtype="float32"), cfg, rank=rank)
    losses = [s.stats.loss for s in train(straight, num_steps=TOTAL, plan_source=source(),
                                          checkpoint_dir=ckpt_dir, checkpoint_every=K)]
    torch.manual_seed(1000 + rank)
    resumed = Trainer(tiny_model(seed=1, dtype="float32"), cfg, rank=rank)
    resumed.restore(f"{ckpt_dir}/step_{K}")
    tail = [s.stats.loss for s in train(resumed, num_steps=TOTAL - K, plan_source=source())]
    same_params = all(torch.equal(a, b) for a, b in zip(straight.model.parameters(),
                                                        resumed.model.parameters(), strict=True))
    return {"losses": losses, "tail": tail, "same_params": same_params,
            "position": resumed.data_position == straight.data_position,
            "max_ring": max(ring_sizes)}


def test_resume_on_four_ranks_with_rings_is_bit_identical(tmp_path, rng):
    with DatasetWriter(tmp_path / "data" / "data") as w:
        for n in rng.integers(2, 90, size=40):
            w.add(rng.integers(0, 256, size=int(n)))
    out = run_distributed(_run, 4, str(tmp_path / "data"), str(tmp_path / "ckpt"),
                          timeout_s=120)
    for rank, r in enumerate(out):
        assert r["tail"] == r["losses"][K:], (rank, r)  # exact equality
        assert r["same_params"] and r["position"], rank
        assert r["losses"] == out[0]["losses"]
        assert r["max_ring"] >= 2  # sequences were split over rings
