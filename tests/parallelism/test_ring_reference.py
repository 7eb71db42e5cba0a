"""The single-process ring simulation and ring_attention on a ring of one, against an
independent float64 full-attention reference (tolerance 1e-10: only the order of float64
sums differs, ~1e-15).
"""

from __future__ import annotations

import pytest
import torch

from parallelism import ring_attention, ring_attention_reference, zigzag_shard, zigzag_unshard
from tests.parallelism.attention_ref import full_attention, rel_err

TOL = 1e-10


def _batch(lengths, hq, hkv, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, h, d, generator=gen, dtype=torch.float64,
                           requires_grad=True) for h in (hq, hkv, hkv))
    dout = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    return cu, q, k, v, dout


@pytest.mark.parametrize(("ring_size", "causal"),
                         [(1, True), (2, True), (3, True), (4, True), (3, False),
                          pytest.param(8, True, marks=pytest.mark.slow)])
def test_simulated_ring_matches_full_attention(ring_size, causal):
    cu, q, k, v, dout = _batch([1, 5, 127, 40, 2], hq=4, hkv=1, seed=ring_size)
    want = full_attention(q, k, v, cu, causal=causal)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    shards = [[zigzag_shard(x, cu, ring_size, j)[0] for j in range(ring_size)]
              for x in (q, k, v)]
    got = zigzag_unshard(ring_attention_reference(*shards, cu_seqlens=cu, causal=causal), cu)
    assert rel_err(got.detach(), want.detach()) <= TOL
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout), want_grads, strict=True):
        assert rel_err(g, w) <= TOL


@pytest.mark.parametrize("causal", [True, False])
def test_ring_of_one_is_local_attention(causal):
    cu, q, k, v, dout = _batch([7, 1, 64, 3], hq=6, hkv=2, seed=5)
    scale = 0.3
    want = full_attention(q, k, v, cu, causal=causal, scale=scale)
    got = ring_attention(q, k, v, cu_seqlens=cu, ring=[0], causal=causal, softmax_scale=scale)
    assert rel_err(got.detach(), want.detach()) <= TOL
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout),
                    torch.autograd.grad(want, (q, k, v), dout), strict=True):
        assert rel_err(g, w) <= TOL


def test_ring_of_one_with_empty_sequences():
    """Zero-length sequences (empty zigzag chunks) are skipped, not sent to the kernel."""
    lengths = [0, 3, 0, 5]
    cu = torch.tensor([0, 0, 3, 3, 8], dtype=torch.int32)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(8, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    got = ring_attention(q, k, v, cu_seqlens=cu, ring=[0])
    want = full_attention(q, k, v, cu, causal=True)
    assert sum(lengths) == 8 and rel_err(got, want) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ring=[1]), r"entries \[1\] that are not ranks of this world"),
        (dict(ring=[]), "non-empty list"),
        (dict(ring=[0, 0]), "more than once"),
        (dict(ring=[0], causal=1), "causal must be a bool"),
        (dict(ring=[0], softmax_scale=-1.0), "softmax_scale must be > 0"),
        (dict(ring=[0], cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
         r"cu_seqlens\[-1\] must equal the local token count"),
    ],
)
def test_user_mistakes_raise_value_error(kwargs, match):
    cu, q, k, v, _ = _batch([4], hq=2, hkv=1)
    kwargs = {"cu_seqlens": cu, **kwargs}
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_value_error():
    cu, q, k, v, _ = _batch([4], hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        ring_attention(q, k, v, cu_seqlens=cu, ring=[0])
    with pytest.raises(ValueError, match=r"3-D tensor \[T, H, D\]"):
        ring_attention(q[0], k, v, cu_seqlens=cu, ring=[0])
    _, q2, k2, v2, _ = _batch([4], hq=2, hkv=2)
    with pytest.raises(ValueError, match="T_local=4"):
        ring_attention(q2, k2[:3], v2[:3], cu_seqlens=cu, ring=[0])
    with pytest.raises(ValueError, match="share a dtype"):  # the checks the ring once skipped
        ring_attention(q2, k2.float(), v2.float(), cu_seqlens=cu, ring=[0])
