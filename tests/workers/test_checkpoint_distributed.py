"""Bit-identical resume on 4 gloo ranks with rings: N steps straight == k steps, DCP save,
a fresh trainer (other initial weights, other RNG) restored, N - k steps; for every
optimizer sharding (none, zero1, distributed). ZeRO-1 (AdamW state sharded by whole
tensors) must also match the unsharded run bit for bit (the same all-reduce, the same
per-element update); the distributed optimizer's reduce-scatter sums in another order, so
it is held to bit-identical resume only (its exactness: test_distributed_optimizer.py).

Data come from a token dataset through workers.data.DatasetPlanSource with a small
deterministic planner (helpers.odd_ring_planner: the two longest sequences on rings
[1, 3] and [2, 0], the rest packed round-robin), so both runs see the same plans. float32 so
that any difference in order of operations would show.
"""

from __future__ import annotations

import pytest
import torch

from parallelism.worlds import run_distributed
from scheduler.dataset import DatasetWriter
from workers.data import DatasetPlanSource
from workers.train import TrainConfig, Trainer, train

from .helpers import odd_ring_planner, tiny_model

pytestmark = pytest.mark.distributed

TOTAL, K = 4, 2


def _source(data_dir: str, rank: int, ring_sizes: list[int]):
    inner = DatasetPlanSource(data_dir, tokens_per_batch=300, seed=1, planner=odd_ring_planner,
                              rank=rank)

    def tracked(position):
        inp = inner(position)
        ring_sizes.extend(len(g.ranks) for _, g in inp.plan.groups())
        return inp
    return tracked


SHARDINGS = ("none", "zero1", "distributed")


def _straight_and_resumed(rank: int, data_dir: str, ckpt_dir: str, sharding: str) -> dict:
    cfg = TrainConfig(lr=2e-3, warmup_steps=1, total_steps=TOTAL, max_grad_norm=0.5,
                      precision="fp32", optimizer_sharding=sharding)
    rings: list[int] = []
    straight = Trainer(tiny_model(seed=0, dtype="float32"), cfg, rank=rank)
    losses = [s.stats.loss for s in train(straight, num_steps=TOTAL,
                                          plan_source=_source(data_dir, rank, rings),
                                          checkpoint_dir=ckpt_dir, checkpoint_every=K)]
    torch.manual_seed(1000 + rank)
    resumed = Trainer(tiny_model(seed=1, dtype="float32"), cfg, rank=rank)
    resumed.restore(f"{ckpt_dir}/step_{K}")
    tail = [s.stats.loss for s in train(resumed, num_steps=TOTAL - K,
                                        plan_source=_source(data_dir, rank, []))]
    same_params = all(torch.equal(a, b) for a, b in zip(straight.model.parameters(),
                                                        resumed.model.parameters(), strict=True))
    return {"losses": losses, "tail": tail, "same_params": same_params,
            "position": resumed.data_position == straight.data_position,
            "max_ring": max(rings),
            "optim_entries": len(resumed.optimizer.owned_parameters()),
            "params": [p.detach().clone() for p in straight.model.parameters()]}


def _run(rank: int, world_size: int, data_dir: str, ckpt_dir: str) -> list[dict]:
    torch.set_num_threads(1)
    return [_straight_and_resumed(rank, data_dir, f"{ckpt_dir}/{s}", s) for s in SHARDINGS]


def test_resume_on_four_ranks_with_rings_is_bit_identical(tmp_path, rng):
    with DatasetWriter(tmp_path / "data" / "data") as w:
        for n in rng.integers(2, 90, size=40):
            w.add(rng.integers(0, 256, size=int(n)))
    out = run_distributed(_run, 4, str(tmp_path / "data"), str(tmp_path / "ckpt"),
                          timeout_s=150)
    num_params = len(list(tiny_model().parameters()))
    for z in range(len(SHARDINGS)):
        for rank, runs in enumerate(out):
            r = runs[z]
            assert r["tail"] == r["losses"][K:], (z, rank, r["tail"], r["losses"])  # exact
            assert r["same_params"] and r["position"], (z, rank)
            assert r["losses"] == out[0][z]["losses"]
            assert r["max_ring"] >= 2  # sequences were split over rings
    # ZeRO-1 shards the AdamW state (every parameter's state on exactly one rank) and
    # changes nothing else: the same per-parameter update, bit for bit.
    assert all(runs[0]["optim_entries"] == num_params for runs in out)
    assert sum(runs[1]["optim_entries"] for runs in out) == num_params
    assert all(0 < runs[1]["optim_entries"] < num_params for runs in out)
    # The distributed optimizer: every rank updates its contiguous shard (a tensor may
    # straddle two ranks), and together the shards cover every parameter.
    assert all(0 < runs[2]["optim_entries"] < num_params for runs in out)
    assert sum(runs[2]["optim_entries"] for runs in out) >= num_params
    for runs in out:
        assert runs[1]["losses"] == runs[0]["losses"]
        assert all(torch.equal(a, b) for a, b in zip(runs[0]["params"], runs[1]["params"],
                                                      strict=True))
