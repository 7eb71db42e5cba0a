"""Torch backend of attention with LSE against the naive float64 reference.

Tolerances: at float64 both sides compute the same sums in a different order (online
softmax over key blocks vs one softmax), so the relative error is a few ulps times the
number of blocks: 1e-12 leaves three orders of margin. bfloat16 is held to at most 2x
torch's own bfloat16 SDPA error, both measured against float64 (the Liger-Kernel rule).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import attention_torch
from kernels.varlen import PackedSeqs
from tests.kernels.reference import PEAK_RSS_SNIPPET, make_cu, naive_attention, rel_err

F64_TOL = 1e-12

# (lens_q, lens_k, Hq, Hkv, D): odd lengths, packing, lq != lk both ways, GQA 1:1/4:1/8:1.
CASES = [
    ([1, 7, 127], [1, 7, 127], 4, 4, 32),
    ([1000], [1000], 8, 2, 64),
    ([7, 1, 33, 127, 2, 50, 9, 64], [7, 1, 33, 127, 2, 50, 9, 64], 8, 1, 32),
    ([5, 127, 40], [13, 100, 40], 4, 1, 128),
    ([3, 1, 64], [200, 9, 1], 8, 2, 64),
]


def _inputs(lens_q, lens_k, hq, hkv, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, hkv, d, generator=gen, dtype=torch.float64).to(dtype)
    dout = torch.randn(tq, hq, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _reference_grads(q, k, v, dout, lens_q, lens_k, causal):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = naive_attention(*leaves, lens_q, lens_k, causal)
    grads = torch.autograd.grad((out * dout.double()).sum(), leaves)
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{len(c[0])}seqs-g{c[2] // c[3]}-d{c[4]}")
def test_forward_backward_float64_match_naive(case, causal):
    lens_q, lens_k, hq, hkv, d = case
    q, k, v, dout = _inputs(lens_q, lens_k, hq, hkv, d)
    cu = dict(cu_seqlens_q=make_cu(lens_q), cu_seqlens_k=make_cu(lens_k), causal=causal)
    out, lse = kernels.attention_with_lse(q, k, v, backend="torch", **cu)
    ref_out, ref_lse, ref_grads = _reference_grads(q, k, v, dout, lens_q, lens_k, causal)
    assert out.dtype == torch.float64 and lse.shape == (hq, q.shape[0])
    assert rel_err(out, ref_out) <= F64_TOL
    assert rel_err(lse, ref_lse) <= F64_TOL
    grads = kernels.attention_with_lse_backward(dout, q, k, v, out, lse, backend="torch", **cu)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, r) <= F64_TOL, f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
def test_small_tiles_exercise_every_block_boundary(causal):
    """Blocks far smaller than the sequences (and not dividing them) change nothing."""
    lens_q, lens_k = [37, 1, 90], [50, 6, 90]
    q, k, v, dout = _inputs(lens_q, lens_k, 6, 3, 16, seed=1)
    seqs = PackedSeqs(cu_q=tuple(make_cu(lens_q).tolist()), cu_k=tuple(make_cu(lens_k).tolist()))
    kw = dict(seqs=seqs, causal=causal, scale=0.3, block_q=7, block_k=5)
    out, lse = attention_torch.attention_forward(q, k, v, **kw)
    grads = attention_torch.attention_backward(dout, q, k, v, out, lse, **kw)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_attention(*leaves, lens_q, lens_k, causal, scale=0.3)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), leaves)
    assert rel_err(out, ref_out) <= F64_TOL and rel_err(lse, ref_lse) <= F64_TOL
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= F64_TOL


def test_rows_without_keys_are_zero_and_never_nan():
    """Causal with lq > lk: the first lq - lk queries see nothing, forward and backward."""
    lens_q, lens_k = [9, 4], [3, 4]
    q, k, v, dout = _inputs(lens_q, lens_k, 2, 1, 32, seed=2)
    cu = dict(cu_seqlens_q=make_cu(lens_q), cu_seqlens_k=make_cu(lens_k), causal=True)
    out, lse = kernels.attention_with_lse(q, k, v, backend="torch", **cu)
    assert torch.equal(out[:6], torch.zeros_like(out[:6]))
    assert torch.isneginf(lse[:, :6]).all() and torch.isfinite(lse[:, 6:]).all()
    dq, dk, dv = kernels.attention_with_lse_backward(dout, q, k, v, out, lse, backend="torch", **cu)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:6], torch.zeros_like(dq[:6]))


def test_autograd_wrapper_matches_naive_gradients():
    lens = [5, 64, 1]
    q, k, v, dout = _inputs(lens, lens, 4, 2, 32, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cu = make_cu(lens)
    out = kernels.attention(*leaves, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    _, _, ref_grads = _reference_grads(q, k, v, dout, lens, lens, True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= F64_TOL


def test_ring_split_merge_and_backward_with_merged_lse():
    """Keys split in two blocks (causal diagonal + earlier block), merged by LSE, then each
    block's backward with the merged out/lse: sums to the full gradients (ring attention)."""
    lq, lk_prev = 23, 31
    q, k, v, dout = _inputs([lq], [lk_prev + lq], 4, 2, 32, seed=4)
    cu_q = make_cu([lq])
    parts = [(slice(0, lk_prev), False), (slice(lk_prev, lk_prev + lq), True)]
    results = []
    for sl, causal in parts:
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=make_cu([sl.stop - sl.start]), causal=causal)
        results.append((sl, kw, *kernels.attention_with_lse(q, k[sl], v[sl], **kw)))
    out, lse = kernels.merge_attention(results[0][2], results[0][3], results[1][2], results[1][3])
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for sl, kw, _, _ in results:
        g = kernels.attention_with_lse_backward(dout, q, k[sl], v[sl], out, lse, **kw)
        dq += g[0]
        dk[sl], dv[sl] = g[1], g[2]
    ref_out, ref_lse, ref_grads = _reference_grads(q, k, v, dout, [lq], [lk_prev + lq], True)
    assert rel_err(out, ref_out) <= F64_TOL and rel_err(lse, ref_lse) <= F64_TOL
    for g, r in zip((dq, dk, dv), ref_grads, strict=True):
        assert rel_err(g, r) <= F64_TOL


def _sdpa_bf16(q, k, v, lens_q, lens_k, causal):
    """torch's own bfloat16 attention per sequence (mask given explicitly: bottom-right)."""
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        mask = torch.ones(lq, lk, dtype=torch.bool)
        mask = mask.tril(diagonal=lk - lq) if causal else mask
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat([o.transpose(0, 1) for o in outs])


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_error_at_most_twice_sdpa(causal):
    lens = [100, 37]
    q, k, v, dout = (t.to(torch.bfloat16) for t in _inputs(lens, lens, 8, 2, 64, seed=5))
    cu = make_cu(lens)
    ref_out, _, ref_grads = _reference_grads(q, k, v, dout, lens, lens, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*leaves, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal)
    grads = torch.autograd.grad(out, leaves, dout)
    sdpa_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa_out = _sdpa_bf16(*sdpa_leaves, lens, lens, causal)
    sdpa_grads = torch.autograd.grad(sdpa_out, sdpa_leaves, dout)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref_out) <= 2 * rel_err(sdpa_out, ref_out)
    for g, s, r in zip(grads, sdpa_grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * rel_err(s, r)


def test_float32_runs_and_returns_float32_lse():
    lens = [17, 3]
    q, k, v, _ = (t.float() for t in _inputs(lens, lens, 4, 4, 32, seed=6))
    cu = make_cu(lens)
    out, lse = kernels.attention_with_lse(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    ref_out, ref_lse = naive_attention(q, k, v, lens, lens, True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    # float32 eps is 1.2e-7; sums of <= 17 terms stay within a few hundred ulps.
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5


_MEMORY_SCRIPT = PEAK_RSS_SNIPPET + """
import torch
import kernels
torch.set_num_threads(1)
t = 16384
q = torch.randn(t, 1, 16)
k, v, dout = torch.randn(t, 1, 16), torch.randn(t, 1, 16), torch.randn(t, 1, 16)
cu = torch.tensor([0, t], dtype=torch.int32)
kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="torch")
base = reset_peak_rss()
out, lse = kernels.attention_with_lse(q, k, v, **kw)
kernels.attention_with_lse_backward(dout, q, k, v, out, lse, **kw)
print(peak_rss_kib() - base)
"""


def test_memory_is_tiles_not_scores():
    """16K tokens causal: the T x T float32 scores alone would be 1 GiB; the peak RSS growth
    of forward + backward must stay under 64 MiB (tiles of 256 x 512 floats, O(T) rows)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True,
                          text=True, timeout=600, check=True)
    extra_kib = int(proc.stdout.strip().splitlines()[-1])
    assert extra_kib < 64 * 1024, extra_kib


@settings(max_examples=15, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=5),
    group=st.sampled_from([1, 2, 3, 4]),
    hkv=st.integers(1, 2),
    head_dim=st.sampled_from([1, 8, 12]),
    causal=st.booleans(),
)
def test_random_varlen_layouts_match_naive(lens, group, hkv, head_dim, causal):
    """Random packings (lq != lk either way), GQA ratios including 3:1, tiny tiles."""
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    q, k, v, dout = _inputs(lens_q, lens_k, group * hkv, hkv, head_dim, seed=len(lens))
    seqs = PackedSeqs(cu_q=tuple(make_cu(lens_q).tolist()), cu_k=tuple(make_cu(lens_k).tolist()))
    kw = dict(seqs=seqs, causal=causal, scale=0.5, block_q=8, block_k=16)
    out, lse = attention_torch.attention_forward(q, k, v, **kw)
    grads = attention_torch.attention_backward(dout, q, k, v, out, lse, **kw)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_attention(*leaves, lens_q, lens_k, causal, scale=0.5)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), leaves)
    assert rel_err(out, ref_out) <= F64_TOL and rel_err(lse, ref_lse) <= F64_TOL
    # A gradient can be exactly zero by symmetry (one key per query: softmax is constant,
    # so dK = 0), where a relative error is undefined and round-off of 1e-17 reads as
    # 1e283; measure each gradient against the largest reference gradient of the problem.
    scale = max(float(r.abs().max()) for r in ref_grads) or 1.0
    for g, r in zip(grads, ref_grads, strict=True):
        assert float((g - r).abs().max()) <= F64_TOL * scale
