"""forward_backward with `ring` on 2 and 3 gloo ranks equals the single-process result.

Each rank runs its zigzag shard (parallelism.zigzag_shard of ids, targets, positions);
summing the ranks' gradients must give plain autograd through `model(...)` on the whole
batch. Tolerance 1e-10 relative at float64: the only cross-rank reduction is the final sum
of gradients plus the ring's log-sum-exp merges, each exact to ~1e-16 per op.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from parallelism.worlds import run_distributed

TOL = 1e-10
LENGTHS = [13, 1, 30, 6]  # not divisible by 2 x ring size; a length-1 sequence
CONFIGS = {
    2: [{}, {"offload_ratio": 0.5}, {"stream_chunk_size": 7}, {"grpo": True}],
    3: [{}, {"offload_ratio": 1.0}, {"grpo": True, "offload_ratio": 0.5}],
}


def _model_and_batch():
    from tests.workers.helpers import perturbed_model_and_batch

    return perturbed_model_and_batch(LENGTHS, data_seed=4)


def _grpo_inputs(num_tokens: int):
    """Per-sequence advantages and per-token old log-probs (global, unsharded)."""
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(len(LENGTHS), generator=g, dtype=torch.float64)
    old = -5.5 + 0.3 * torch.randn(num_tokens, generator=g, dtype=torch.float64)
    return adv, old


def _rank_fn(rank: int, world_size: int, configs):
    from parallelism.zigzag import zigzag_shard
    from workers.model import next_token_targets
    from workers.objectives import GRPO

    torch.set_num_threads(1)
    model, ids, cu = _model_and_batch()
    ids_l, cu_l, pos_l = zigzag_shard(ids, cu, world_size, rank)
    tgt_l = zigzag_shard(next_token_targets(ids, cu), cu, world_size, rank)[0]
    out = []
    adv, old = _grpo_inputs(ids.shape[0])
    for kwargs in configs:
        kwargs = dict(kwargs)
        if kwargs.pop("grpo", False):
            kwargs["objective"] = GRPO(advantages=adv,
                                       old_logps=zigzag_shard(old, cu, world_size, rank)[0])
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, num = model.forward_backward(ids_l, cu_seqlens=cu_l, position_ids=pos_l,
                                               targets=tgt_l, ring=list(range(world_size)),
                                               grad_scale=0.5, **kwargs)
        out.append((float(loss), num,
                    {n: p.grad.numpy().copy() for n, p in model.named_parameters()},
                    [str(w.message) for w in caught]))
    return out  # numpy, not tensors: tensors would travel as shared-memory handles


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_forward_backward_equals_single_process(world_size):
    from workers.model import next_token_targets
    from workers.objectives import GRPO

    model, ids, cu = _model_and_batch()
    loss = F.cross_entropy(model(ids, cu_seqlens=cu), next_token_targets(ids, cu),
                           reduction="sum")
    (loss * 0.5).backward()
    sft = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    # GRPO's single-process result (itself checked against the unchunked formula in
    # test_model_objectives.py)
    model.zero_grad(set_to_none=True)
    adv, old = _grpo_inputs(ids.shape[0])
    grpo_loss, _ = model.forward_backward(ids, cu_seqlens=cu, grad_scale=0.5,
                                          objective=GRPO(advantages=adv, old_logps=old))
    grpo = (float(grpo_loss), {n: p.grad.clone() for n, p in model.named_parameters()})
    configs = CONFIGS[world_size]
    results = run_distributed(_rank_fn, world_size, configs, timeout_s=120)
    for c, kwargs in enumerate(configs):
        want_loss, want = grpo if kwargs.get("grpo") else sft
        per_rank = [r[c] for r in results]
        assert abs(sum(r[0] for r in per_rank) - want_loss) <= TOL * abs(want_loss), kwargs
        assert sum(r[1] for r in per_rank) == sum(LENGTHS) - len(LENGTHS)
        for name, g in want.items():
            got = sum(torch.from_numpy(r[2][name]) for r in per_rank)
            err = ((got - g).norm() / g.norm()).item()
            assert err <= TOL, f"{kwargs} {name}: relative error {err:.2e}"
        if "stream_chunk_size" in kwargs:
            assert any("docs/streambp.md" in w for w in per_rank[0][3])
