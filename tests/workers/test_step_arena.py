"""run_step through MEMO activation arenas: bit-identical to running without them.

One process (a world of one rank), several packed micro-batches of different sizes and
kinds: the first of a kind is recorded and planned, a smaller one reuses that arena, a
larger one re-plans. Loss and every gradient must equal the run without arenas exactly
(the arena only copies saved tensors into planned slots), and both must match plain
autograd (float64, 1e-10: summation order differs from the fused step).
"""

from __future__ import annotations

import torch

from workers.arena import ArenaCache
from workers.step import run_step

from .helpers import (
    group,
    max_rel_err,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread)
    plan_of,
    random_samples,
    reference_loss_and_grads,
    tiny_model,
)

LENGTHS = [37, 5, 1, 60, 9, 21, 90, 3]


def plan():
    return plan_of(1, [
        [group([0], [(0, 37), (1, 5), (2, 1)])],      # 43 tokens: recorded
        [group([0], [(3, 60), (4, 9)])],              # 69 tokens: larger, re-planned
        [group([0], [(5, 21)])],                      # 21 tokens: fits, reuses the arena
        [group([0], [(6, 90), (7, 3)])],              # 93 tokens: larger again
    ])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_arena_step_equals_plain_step_bit_for_bit():
    samples = random_samples(LENGTHS, seed=5)
    plain = tiny_model(seed=3)
    want = run_step(plain, plan(), samples, rank=0)
    model = tiny_model(seed=3)
    arenas = ArenaCache(parameters=model.parameters(), device="cpu", time_limit_s=2.0)
    got = run_step(model, plan(), samples, rank=0, arenas=arenas)
    assert got.loss == want.loss
    for name, g in grads(model).items():
        assert torch.equal(g, grads(plain)[name]), name
    assert got.arena_bytes == arenas.nbytes > 0 and want.arena_bytes == 0
    # 43 tokens/3 seqs, then 69/2 (not covered), 21/1 (fits), 93/2 (covers 69/2): three
    # recordings; the second step finds an arena for every micro-batch and stays exact.
    assert arenas.num_recorded == 3
    again = run_step(model, plan(), samples, rank=0, arenas=arenas)
    assert again.loss == want.loss and arenas.num_recorded == 3

    ref_loss, ref_grads = reference_loss_and_grads(tiny_model(seed=3), samples)
    assert abs(got.loss - ref_loss) <= 1e-10 * abs(ref_loss)
    assert max_rel_err(grads(model), ref_grads) <= 1e-10


def test_trainer_with_arenas_trains_bit_identically():
    from workers.train import TrainConfig, Trainer

    samples = random_samples(LENGTHS, seed=6)
    runs = {}
    for mode in ("off", "on"):
        trainer = Trainer(tiny_model(seed=4), TrainConfig(lr=1e-2, activation_arena=mode,
                                                          precision="fp64"), rank=0)
        runs[mode] = [trainer.train_step(plan(), samples).stats.loss for _ in range(3)]
        assert (trainer.arenas is None) == (mode == "off")
    assert runs["on"] == runs["off"]
    assert runs["on"][2] < runs["on"][0]  # it trains
