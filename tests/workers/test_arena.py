"""Activation arena: training through it gives bit-identical loss and gradients.

Reference: the same model, same data, plain autograd without the arena (float64, so any
mix-up of slots would show as a large error, not rounding). Equality is exact because the
arena only copies tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scheduler.specs import model_preset
from tests.scheduler.test_memory import check_plan
from workers.arena import ActivationArena, plan_arena, record_saved_tensors
from workers.model import Transformer


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_preset("tiny").model_copy(update={"dtype": "float64"}))


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 1, 13]                                   # odd lengths on purpose
    ids = torch.randint(0, 256, (sum(lengths),), generator=gen)
    cu = torch.tensor([0, 7, 8, 21], dtype=torch.int32)
    return ids, cu


def plain_step(model: Transformer, ids, cu) -> torch.Tensor:
    logits = model(ids, cu)
    loss = F.cross_entropy(logits[:-1], ids[1:])
    loss.backward()
    return loss.detach()


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_plain_autograd_step_is_exact_through_the_arena():
    ids, cu = batch()
    ref = tiny_model()
    ref_loss = plain_step(ref, ids, cu)
    model = tiny_model()
    arena = ActivationArena.for_step(lambda: plain_step(model, ids, cu),
                                     parameters=model.parameters())
    model.zero_grad(set_to_none=True)
    with arena.saving():
        loss = plain_step(model, ids, cu)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads(model), grads(ref), strict=True):
        assert torch.equal(g, r)
    assert arena.nbytes >= arena.plan.max_live_bytes > 0


def test_fused_forward_backward_with_streamed_head_is_exact_and_reuses_slots():
    ids, cu = batch(seed=3)
    ref, model = tiny_model(), tiny_model()

    def step(m):
        return m.forward_backward(ids, cu_seqlens=cu, stream_chunk_size=5)[0]

    ref_loss = step(ref)
    arena = ActivationArena.for_step(lambda: step(model), parameters=model.parameters())
    model.zero_grad(set_to_none=True)
    with arena.saving():
        loss = step(model)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads(model), grads(ref), strict=True):
        assert torch.equal(g, r)
    # Chunks pack and unpack in turn, so slots are reused: the arena is smaller than the
    # sum of everything saved.
    trace = arena.trace
    assert arena.nbytes < sum(-(-n // 512) * 512 for n in trace.nbytes)
    check_plan(arena.plan, list(trace.nbytes), list(trace.lifetimes), alignment=512)


def test_a_few_training_steps_match_without_the_arena():
    ids, cu = batch(seed=5)
    ref, model = tiny_model(), tiny_model()
    arena = ActivationArena.for_step(lambda: plain_step(model, ids, cu),
                                     parameters=model.parameters())
    for m, use_arena in ((ref, False), (model, True)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            if use_arena:
                with arena.saving():
                    plain_step(m, ids, cu)
            else:
                plain_step(m, ids, cu)
            opt.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, r)


def test_parameters_are_saved_by_reference_not_copied():
    model = tiny_model()
    ids, cu = batch()
    with_params = record_saved_tensors(lambda: plain_step(model, ids, cu),
                                       parameters=model.parameters())
    assert with_params.num_by_reference > 0
    plan = plan_arena(with_params, time_limit_s=1.0)
    assert plan.peak_bytes == plan.max_live_bytes   # fwd-then-bwd saves nest: a stack


def test_a_different_step_is_refused_with_the_reason():
    model = tiny_model()
    ids, cu = batch()
    arena = ActivationArena.for_step(lambda: plain_step(model, ids, cu),
                                     parameters=model.parameters())
    other_ids = torch.cat([ids, ids])                        # longer than planned
    other_cu = torch.tensor([0, 7, 8, 42], dtype=torch.int32)
    with pytest.raises(ValueError, match="re-plan"), arena.saving():
        plain_step(model, other_ids, other_cu)


def test_an_arena_planned_for_a_long_batch_serves_a_shorter_one_exactly():
    ids, cu = batch()                                       # 21 tokens in 3 sequences
    model = tiny_model()
    arena = ActivationArena.for_step(lambda: plain_step(model, ids, cu),
                                     parameters=model.parameters())
    gen = torch.Generator().manual_seed(9)
    short_ids = torch.randint(0, 256, (15,), generator=gen)
    short_cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)   # same structure, shorter
    ref = tiny_model()
    ref_loss = plain_step(ref, short_ids, short_cu)
    model.zero_grad(set_to_none=True)
    with arena.saving():
        loss = plain_step(model, short_ids, short_cu)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads(model), grads(ref), strict=True):
        assert torch.equal(g, r)
