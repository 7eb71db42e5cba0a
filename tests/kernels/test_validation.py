"""Garbage in raises ValueError naming the argument, for every public kernel entry point."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.reference import make_cu


def _good():
    q = torch.randn(10, 4, 16)
    k = torch.randn(12, 2, 16)
    v = torch.randn(12, 2, 16)
    return dict(
        q=q, k=k, v=v, cu_seqlens_q=make_cu([3, 7]), cu_seqlens_k=make_cu([5, 7]), causal=True
    )


def _call(**kw):
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    return kernels.attention_with_lse(q, k, v, **kw)


BAD_FORWARD = [
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 10], dtype=torch.int64))),
    ("cu_seqlens_k", dict(cu_seqlens_k=torch.tensor([0, 7, 5, 12], dtype=torch.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 10], dtype=torch.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([1, 3, 10], dtype=torch.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=[0, 3, 10])),
    ("cu_seqlens_q and cu_seqlens_k", dict(cu_seqlens_k=make_cu([12]))),
    ("Hq=4", dict(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16))),
    ("v must have the shape of k", dict(v=torch.randn(12, 2, 8))),
    ("k head dim", dict(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8))),
    ("q must be a 3-D", dict(q=torch.randn(10, 64))),
    ("share a dtype", dict(q=torch.randn(10, 4, 16, dtype=torch.float64))),
    ("causal", dict(causal=1)),
    ("softmax_scale", dict(softmax_scale=-1.0)),
    ("backend", dict(backend="cuda")),
    ("backend='triton'", dict(backend="triton")),
]


@pytest.mark.parametrize("needle,change", BAD_FORWARD, ids=[b[0] for b in BAD_FORWARD])
def test_forward_rejects_garbage_naming_the_argument(needle, change, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kw = _good() | change
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        _call(**kw)


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
def test_backward_rejects_misshapen_extras(name):
    kw = _good()
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    out, lse = kernels.attention_with_lse(q, k, v, **kw)
    args = dict(dout=torch.randn_like(out), out=out, lse=lse)
    args[name] = args[name][:-1]
    with pytest.raises(ValueError, match=name):
        kernels.attention_with_lse_backward(args["dout"], q, k, v, args["out"], args["lse"], **kw)


def test_merge_rejects_mismatched_shapes():
    out, lse = torch.randn(5, 2, 8), torch.randn(2, 5)
    with pytest.raises(ValueError, match="out_b"):
        kernels.merge_attention(out, lse, out[:4], lse[:, :4])
    with pytest.raises(ValueError, match="lse_b"):
        kernels.merge_attention(out, lse, out, lse.T)


BAD_CE = [
    ("weight must be \\[V, H\\]", dict(weight=torch.randn(11, 5))),
    ("targets must have shape", dict(targets=torch.zeros(7, dtype=torch.long))),
    ("targets must be int32 or int64", dict(targets=torch.zeros(6))),
    ("targets must be in", dict(targets=torch.tensor([0, 1, 2, 11, 4, 5]))),
    ("hidden must be a 2-D", dict(hidden=torch.randn(6, 1, 4))),
    ("chunk_size", dict(chunk_size=0)),
    ("share a floating dtype", dict(weight=torch.randn(11, 4, dtype=torch.float64))),
]


@pytest.mark.parametrize("needle,change", BAD_CE, ids=[b[0][:24] for b in BAD_CE])
def test_linear_ce_rejects_garbage(needle, change):
    kw = dict(hidden=torch.randn(6, 4), weight=torch.randn(11, 4), targets=torch.arange(6))
    kw |= change
    with pytest.raises(ValueError, match=needle):
        kernels.linear_cross_entropy(
            kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw
        )


@pytest.mark.parametrize(
    "needle,dtype,head_dim",
    [("supports dtypes", torch.float64, 16), ("head dim <= 256", torch.float32, 288)],
)
def test_triton_backend_rejects_what_it_cannot_run(needle, dtype, head_dim, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, no kernel launched
    q = torch.randn(4, 2, head_dim, dtype=dtype)
    cu = make_cu([4])
    with pytest.raises(ValueError, match=needle):
        kernels.attention_with_lse(
            q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=False, backend="triton"
        )
