"""Independent float64 full attention over a packed varlen batch, for the ring tests.

Written from the definition, one sequence at a time, with no code shared with parallelism/:
out[t] = sum_{k visible} softmax_k(q[t].k[k] * scale) v[k], a key visible iff it is in the
same sequence and (causal) not after the query. GQA: query head h uses kv head h // g.
"""

from __future__ import annotations

import torch


def full_attention(q, k, v, cu_seqlens, *, causal: bool, scale: float | None = None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    cu = [int(c) for c in cu_seqlens]
    for start, end in zip(cu, cu[1:], strict=False):
        if end == start:
            continue
        qs = q[start:end]
        ks = k[start:end].repeat_interleave(groups, dim=1)
        vs = v[start:end].repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            n = end - start
            future = torch.ones(n, n, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (max-norm relative error)."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def sdpa_attention(q, k, v, cu_seqlens, *, causal: bool):
    """torch's own scaled_dot_product_attention per sequence, in the inputs' dtype: the
    yardstick for low-precision error (our error may be a small multiple of its error)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    cu = [int(c) for c in cu_seqlens]
    for start, end in zip(cu, cu[1:], strict=False):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)
