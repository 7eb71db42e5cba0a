"""merge_attention against attention over the union of key sets (naive float64)."""

from __future__ import annotations

import itertools

import torch

import kernels
from tests.kernels.reference import make_cu, naive_attention, rel_err


def test_merging_three_key_blocks_in_any_order_equals_full_attention():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(11, 4, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(30, 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(30, 2, 16, generator=gen, dtype=torch.float64)
    cu_q = make_cu([11])
    blocks = [slice(0, 4), slice(4, 19), slice(19, 30)]
    parts = [
        kernels.attention_with_lse(
            q, k[b], v[b], cu_seqlens_q=cu_q, cu_seqlens_k=make_cu([b.stop - b.start]),
            causal=False,
        )
        for b in blocks
    ]
    ref_out, ref_lse = naive_attention(q, k, v, [11], [30], causal=False)
    for order in itertools.permutations(range(3)):
        out, lse = parts[order[0]]
        for i in order[1:]:
            out, lse = kernels.merge_attention(out, lse, *parts[i])
        # Merging is exact up to rounding of exp/log: a few ulps at float64.
        assert rel_err(out, ref_out) <= 1e-13 and rel_err(lse, ref_lse) <= 1e-13


def test_sides_without_keys_carry_no_weight_and_no_nan():
    out_a = torch.randn(3, 2, 4, dtype=torch.bfloat16)
    lse_a = torch.tensor([[0.5, float("-inf"), float("-inf")]] * 2)
    out_b = torch.zeros(3, 2, 4, dtype=torch.bfloat16)
    lse_b = torch.full((2, 3), float("-inf"))
    out, lse = kernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(out[0], out_a[0].float())
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    assert torch.isneginf(lse[:, 1:]).all() and torch.equal(lse[:, 0], lse_a[:, 0])
