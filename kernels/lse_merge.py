"""Merging two partial attention results by their log-sum-exps (the ring-attention step).

If ``(O_a, lse_a)`` is softmax attention of a query over key set A and ``(O_b, lse_b)`` over
a disjoint key set B, attention over A u B is (Milakov & Gimelshein 2018, online softmax;
the rescaling of FlashAttention Alg. 1 line 10):

    lse = log(e^{lse_a} + e^{lse_b}),   O = e^{lse_a - lse} O_a + e^{lse_b - lse} O_b.

A side that saw no key carries ``lse = -inf`` and weight 0; if neither saw a key the result
is ``O = 0``, ``lse = -inf`` (never NaN). This is the one place the merge math lives.
"""

from __future__ import annotations

import torch

from kernels.varlen import accumulation_dtype

NEG_INF = float("-inf")


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results; ``out_*`` are ``[T, H, D]``, ``lse_*`` are ``[H, T]``.

    Returns ``(out, lse)`` in float32 (float64 if any input is float64), so a ring can keep
    accumulating without rounding to the inputs' dtype between steps.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(
            f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}"
        )
    expected = (out_a.shape[1], out_a.shape[0])
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != expected:
            raise ValueError(
                f"{name} must have shape [H, T] = {list(expected)}, got {tuple(lse.shape)}"
            )
    dtype = torch.promote_types(
        accumulation_dtype(out_a.dtype), accumulation_dtype(out_b.dtype)
    )
    dtype = torch.promote_types(dtype, torch.promote_types(lse_a.dtype, lse_b.dtype))
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    lse = torch.logaddexp(lse_a, lse_b)
    lse_safe = torch.where(lse == NEG_INF, 0.0, lse)
    w_a = torch.exp(lse_a - lse_safe).T.unsqueeze(-1)
    w_b = torch.exp(lse_b - lse_safe).T.unsqueeze(-1)
    out = w_a * out_a.to(dtype) + w_b * out_b.to(dtype)
    return out, lse
