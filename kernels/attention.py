"""Public attention with log-sum-exp: forward, backward, autograd wrapper, backend choice.

The primitive ring attention and the model are built on (FlashAttention-2, arXiv
2307.08691, Alg. 1 forward / Alg. 2 backward), over packed varlen sequences with GQA and
bottom-right causal alignment (see kernels/varlen.py for the layout and the mask).

Backends: ``torch`` (kernels/attention_torch.py, any device and dtype, memory
O(T x block)) and ``triton`` (kernels/attention_triton.py, CUDA in float16/bfloat16/
float32; also runs under ``TRITON_INTERPRET=1`` on CPU). ``auto`` picks triton for CUDA
tensors of a dtype it supports and torch otherwise.

``lse`` is ``[Hq, Tq]`` in float32 (float64 when the inputs are float64, so a float64
reference run is exact to ~1e-15 throughout); ``out`` has q's dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kernels import attention_torch
from kernels.varlen import validate_attention, validate_backward_extras

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
"""Larger heads would not fit a tile of q, k and v in shared memory."""


def _triton_usable(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Turn ``auto`` into a concrete backend; reject ``triton`` where it cannot run."""
    if backend == "auto":
        fits = q.dtype in TRITON_DTYPES and q.shape[2] <= TRITON_MAX_HEAD_DIM
        return "triton" if q.is_cuda and fits else "torch"
    if backend == "triton":
        if not _triton_usable(q):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                f"{q.device}; use backend='torch' or 'auto'"
            )
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"backend='triton' supports dtypes {TRITON_DTYPES}, got {q.dtype}; use "
                f"backend='torch' for it"
            )
        if q.shape[2] > TRITON_MAX_HEAD_DIM:
            raise ValueError(
                f"backend='triton' supports head dim <= {TRITON_MAX_HEAD_DIM}, got "
                f"{q.shape[2]}; use backend='torch'"
            )
    return backend


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of packed ``q [Tq, Hq, D]`` over ``k, v [Tk, Hkv, D]``.

    Returns ``(out [Tq, Hq, D] in q.dtype, lse [Hq, Tq])``. Not differentiable by autograd;
    use :func:`attention` for that, or :func:`attention_with_lse_backward` directly.
    """
    seqs, scale = validate_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
        softmax_scale=softmax_scale, backend=backend,
    )
    with torch.no_grad():
        if resolve_backend(backend, q) == "triton":
            from kernels import attention_triton

            return attention_triton.attention_forward(
                q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqs=seqs,
                causal=causal, scale=scale,
            )
        return attention_torch.attention_forward(q, k, v, seqs=seqs, causal=causal, scale=scale)


def attention_with_lse_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of attention given ``dout``, ``out`` and ``lse``.

    ``out`` and ``lse`` may be the merged results over more keys than ``k, v`` (a ring
    step): the result is then this block's contribution to the full gradients.
    """
    seqs, scale = validate_attention(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
        softmax_scale=softmax_scale, backend=backend,
    )
    validate_backward_extras(dout, q, out, lse)
    with torch.no_grad():
        if resolve_backend(backend, q) == "triton":
            from kernels import attention_triton

            return attention_triton.attention_backward(
                dout, q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, seqs=seqs, causal=causal, scale=scale,
            )
        return attention_torch.attention_backward(
            dout, q, k, v, out, lse, seqs=seqs, causal=causal, scale=scale
        )


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, causal: bool, softmax_scale: float | None, backend: str,
    ) -> torch.Tensor:
        out, lse = attention_with_lse(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=causal,
            softmax_scale=softmax_scale, backend=backend,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
        return out

    @staticmethod
    def backward(
        ctx: Any, dout: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None, None, None]:
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = attention_with_lse_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, causal=ctx.causal, softmax_scale=ctx.softmax_scale,
            backend=ctx.backend,
        )
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable single-device attention; returns ``out [Tq, Hq, D]`` only."""
    return _Attention.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, backend
    )
