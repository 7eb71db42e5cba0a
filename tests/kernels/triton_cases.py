"""Run the Triton kernels under TRITON_INTERPRET=1 and print their errors as JSON.

Triton decides at decoration time whether a kernel is interpreted, so this runs as its own
process (``python -m tests.kernels.triton_cases``) with the variable set before kernels/ is
imported; test_triton_interpret.py starts it once and checks every number it prints.
Errors are relative to max |reference| against the naive float64 references.
"""

from __future__ import annotations

import json
import os

import torch

# (name, lens_q, lens_k, Hq, Hkv, D, causal, dtype): odd lengths, lq != lk both ways (rows
# with no visible key included), GQA 1:1/2:1/3:1/4:1/8:1, padded head dim 24.
ATTENTION_CASES = [
    ("packed-causal-f32", [1, 7, 20], [1, 7, 20], 2, 1, 32, True, torch.float32),
    ("lq-ne-lk-causal-f32", [5, 33, 3], [20, 17, 1], 4, 1, 24, True, torch.float32),
    ("lq-ne-lk-full-f32", [5, 33, 3], [20, 17, 1], 4, 1, 24, False, torch.float32),
    ("gqa8-causal-f32", [19], [19], 8, 1, 64, True, torch.float32),
    ("d128-mha-f32", [9, 4], [9, 6], 2, 2, 128, True, torch.float32),
    ("gqa3-d16-f32", [13, 2], [29, 40], 3, 1, 16, True, torch.float32),
    ("packed-causal-f16", [1, 7, 20], [1, 7, 20], 2, 1, 32, True, torch.float16),
    ("lq-ne-lk-causal-f16", [5, 33, 3], [20, 17, 1], 4, 1, 24, True, torch.float16),
]

CE_CASES = [("ce-f32", torch.float32), ("ce-f16", torch.float16)]


def _attention_errors(lens_q, lens_k, hq, hkv, d, causal, dtype) -> dict[str, float]:
    import kernels
    from tests.kernels.reference import make_cu, naive_attention, rel_err

    gen = torch.Generator().manual_seed(sum(lens_q) * 31 + d)
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype)
    dout = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype)
    cu = dict(cu_seqlens_q=make_cu(lens_q), cu_seqlens_k=make_cu(lens_k), causal=causal)
    out, lse = kernels.attention_with_lse(q, k, v, backend="triton", **cu)
    grads = kernels.attention_with_lse_backward(dout, q, k, v, out, lse, backend="triton", **cu)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_attention(*leaves, lens_q, lens_k, causal)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), leaves)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    errors |= {f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)}
    finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
    return errors | {"finite": float(finite), "out_dtype_ok": float(out.dtype == dtype)}


def _ring_merge_errors() -> dict[str, float]:
    """A ring step's shape: keys split into an earlier block (full) and the diagonal block
    (causal), merged by LSE, then each block's backward from the merged out/lse."""
    import kernels
    from tests.kernels.reference import make_cu, naive_attention, rel_err

    lq, lk_prev, hq, hkv, d = 21, 35, 4, 2, 32
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(lq, hq, d, generator=gen)
    k = torch.randn(lk_prev + lq, hkv, d, generator=gen)
    v = torch.randn(lk_prev + lq, hkv, d, generator=gen)
    dout = torch.randn(lq, hq, d, generator=gen)
    blocks = [(slice(0, lk_prev), False), (slice(lk_prev, lk_prev + lq), True)]
    kws = [dict(cu_seqlens_q=make_cu([lq]), cu_seqlens_k=make_cu([sl.stop - sl.start]),
                causal=causal, backend="triton") for sl, causal in blocks]
    parts = [kernels.attention_with_lse(q, k[sl], v[sl], **kw)
             for (sl, _), kw in zip(blocks, kws, strict=True)]
    out, lse = kernels.merge_attention(*parts[0], *parts[1])
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for (sl, _), kw in zip(blocks, kws, strict=True):
        g = kernels.attention_with_lse_backward(dout, q, k[sl], v[sl], out, lse, **kw)
        dq += g[0]
        dk[sl], dv[sl] = g[1], g[2]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_attention(*leaves, [lq], [lk_prev + lq], True)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), leaves)
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    return errors | {f"d{n}": rel_err(g, r)
                     for n, g, r in zip("qkv", (dq, dk, dv), ref_grads, strict=True)}


def _ce_errors(dtype) -> dict[str, float]:
    import kernels
    from tests.kernels.reference import naive_linear_ce, rel_err

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 32, generator=gen).to(dtype)
    weight = (torch.randn(203, 32, generator=gen) / 6).to(dtype)
    targets = torch.randint(0, 203, (37,), generator=gen)
    targets[::5] = -100
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, num_valid = kernels.linear_cross_entropy(
        *leaves, targets, chunk_size=16, backend="triton"
    )
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    ref_loss, ref_count = naive_linear_ce(*ref_leaves, targets)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    return {
        "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        "dhidden": rel_err(grads[0], ref_grads[0]),
        "dweight": rel_err(grads[1], ref_grads[1]),
        "count_ok": float(int(num_valid) == ref_count),
    }


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {name: _attention_errors(*args) for name, *args in ATTENTION_CASES}
    results |= {name: _ce_errors(dtype) for name, dtype in CE_CASES}
    results["ring-merge-f32"] = _ring_merge_errors()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
