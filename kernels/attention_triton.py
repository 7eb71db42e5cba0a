"""Triton kernels for varlen GQA attention with log-sum-exp: forward, backward (CUDA).

FlashAttention-2 (Dao 2023, arXiv 2307.08691): forward is Alg. 1 (online softmax over key
blocks, one program per (query block, q head, sequence)); backward is Alg. 2 split into two
kernels that each own their output, so no atomics and deterministic results:

* ``_attn_bwd_dkdv``: one program per (key block, kv head, sequence) walks every query
  block of every q head of its GQA group:  dV += P^T dO,  dK += dS^T Q.
* ``_attn_bwd_dq``: one program per (query block, q head, sequence):  dQ += dS K,
  with  P = exp(S - lse)  and  dS = P * (dO V^T - delta),  delta = rowsum(dO * O).

Scores live in the log2 domain (``qk_scale = softmax_scale * log2 e``; exp2 is the cheap
instruction); lse is stored in natural log. Causal masks are bottom-right per sequence
(query i sees keys <= i + lk - lq); only the key blocks that straddle the diagonal or the
sequence end pay for a mask, blocks wholly below the diagonal run unmasked, blocks wholly
above it are never visited. Rows that see no key produce out 0, lse -inf, gradient 0.

Inputs may be float16, bfloat16 (GPU) or float32; matmuls accumulate in float32. The
same code runs under ``TRITON_INTERPRET=1`` on CPU at tiny block sizes for the tests
(the interpreter computes bfloat16 wrongly, triton-lang/triton#11584, so those tests use
float32/float16). Memory: O(T x H x D) outputs plus a float32 [Hq, Tq] delta.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.varlen import PackedSeqs

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True, kw_only=True)
class _Tiles:
    """Launch shape of one kernel."""

    block_m: int
    """Query rows per tile."""
    block_n: int
    """Key rows per tile."""
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(kind: str, head_dim: int, dtype: torch.dtype) -> _Tiles:
    """Fixed tile table: the Triton tutorial's tile shapes, with warp counts picked so the
    sm_90 build of each kernel spills no (or few) registers (checked with cuobjdump
    --dump-resource-usage at head_dim 64/128: forward none, dq <= 32 B, dkdv none at 64
    and ~800 B at 128, where the tutorial's own backward spills ~500-2900 B)."""
    if _interpreting():
        return _Tiles(block_m=16, block_n=16, num_warps=1, num_stages=1)
    wide = head_dim > 128 or dtype == torch.float32  # halve tiles to fit shared memory
    stages = 2 if wide else 3
    if kind == "fwd":
        return _Tiles(block_m=64 if wide else 128, block_n=32 if wide else 64,
                      num_warps=8 if head_dim >= 128 else 4, num_stages=stages)
    if kind == "dkdv":
        return _Tiles(block_m=16 if wide else 32, block_n=64 if wide else 128, num_warps=8,
                      num_stages=stages)
    return _Tiles(block_m=64 if wide else 128, block_n=16 if wide else 32, num_warps=8,
                  num_stages=stages)


@triton.jit
def _load_tile(base, rows, stride, rows_ok, d_ok, CHECK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, D] tile at ``base + row * stride + d``; zeros outside the sequence or
    the (padded) head dim. Offsets are computed here, per tile, so no pointer tensor stays
    live across a loop (that costs registers)."""
    ptrs = base + rows[:, None] * stride + tl.arange(0, BLOCK_D)[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _seq_bounds(CU_Q, CU_K, b):
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    return q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start


@triton.jit
def _key_range(start_m, lq, lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """Keys [0, hi) some row of the query block sees; keys [0, full) all rows see."""
    if CAUSAL:
        diag = lk - lq
        hi = tl.maximum(tl.minimum(lk, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(hi, start_m + diag + 1), 0)
    else:
        hi = lk
        full = lk
    return (full // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_k, stride_v, lo, hi, offs_m, diag,
                lk, d_ok, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + tl.arange(0, BLOCK_N)
        keys_ok = keys < lk
        k = _load_tile(k_base, keys, stride_k, keys_ok, d_ok, MASKED, EVEN_D, BLOCK_D)
        v = _load_tile(v_base, keys, stride_v, keys_ok, d_ok, MASKED, EVEN_D, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = keys_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 so exp2 gives 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_ot, stride_oh, stride_lh,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    # Last query blocks first: under a causal mask they have the most keys to visit.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    q_start, lq, k_start, lk = _seq_bounds(CU_Q, CU_K, tl.program_id(2))
    if start_m >= lq:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_ok, d_ok = offs_m < lq, tl.arange(0, BLOCK_D) < HEAD_DIM
    kvh = h // GROUP
    q = _load_tile(Q + q_start.to(tl.int64) * stride_qt + h * stride_qh, offs_m, stride_qt,
                   rows_ok, d_ok, True, EVEN_D, BLOCK_D)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _key_range(start_m, lq, lk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0,
                                full, offs_m, lk - lq, lk, d_ok, qk_scale, CAUSAL, False,
                                EVEN_D, BLOCK_N, BLOCK_D, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full,
                                hi, offs_m, lk - lq, lk, d_ok, qk_scale, CAUSAL, True,
                                EVEN_D, BLOCK_N, BLOCK_D, PRECISION)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (O + q_start.to(tl.int64) * stride_ot + h * stride_oh
              + offs_m[:, None] * stride_ot + tl.arange(0, BLOCK_D)[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=rows_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, num_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                    stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32 (FA-2 Alg. 2 line 4)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_lh + offs_m, delta, mask=offs_m < num_tokens)


@triton.jit
def _load_lse_delta(LSE, DELTA, h, stride_lh, q_start, offs_m, rows_ok):
    """lse in log2 units, with -inf (row saw no key) turned into +inf so P = 0, and delta."""
    lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=rows_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=rows_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, DELTA, h, q_start, lq, lo, hi, offs_n,
                 diag, stride_qt, stride_dot, stride_lh, d_ok, qk_scale, MASKED: tl.constexpr,
                 EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < lq
        q = _load_tile(q_base, offs_m, stride_qt, rows_ok, d_ok, True, EVEN_D, BLOCK_D)
        do = _load_tile(do_base, offs_m, stride_dot, rows_ok, d_ok, True, EVEN_D, BLOCK_D)
        lse, delta = _load_lse_delta(LSE, DELTA, h, stride_lh, q_start, offs_m, rows_ok)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, softmax_scale, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_lh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    kvh = tl.program_id(1)
    q_start, lq, k_start, lk = _seq_bounds(CU_Q, CU_K, tl.program_id(2))
    if start_n >= lk:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keys_ok, d_ok = offs_n < lk, tl.arange(0, BLOCK_D) < HEAD_DIM
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    k = _load_tile(k_base, offs_n, stride_kt, keys_ok, d_ok, True, EVEN_D, BLOCK_D)
    v = _load_tile(v_base, offs_n, stride_vt, keys_ok, d_ok, True, EVEN_D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = lk - lq
    lo = 0
    full = 0
    if CAUSAL:
        # Rows below `lo` see none of these keys; rows from `full` on see all of them.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, lo), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, tl.cdiv(lq, BLOCK_M) * BLOCK_M)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
        do_base = DO + q_start.to(tl.int64) * stride_dot + h * stride_doh
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, DELTA, h, q_start, lq, lo,
                              full, offs_n, diag, stride_qt, stride_dot, stride_lh, d_ok,
                              qk_scale, True, EVEN_D, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, DELTA, h, q_start, lq, full,
                              lq, offs_n, diag, stride_qt, stride_dot, stride_lh, d_ok,
                              qk_scale, False, EVEN_D, BLOCK_M, BLOCK_D, PRECISION)
    mask = keys_ok[:, None] & d_ok[None, :]
    offs = offs_n[:, None] * stride_kt + tl.arange(0, BLOCK_D)[None, :]
    tl.store(DK + k_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs,
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=mask)
    offs = offs_n[:, None] * stride_vt + tl.arange(0, BLOCK_D)[None, :]
    tl.store(DV + k_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_k, stride_v, lo, hi, offs_m,
               diag, lk, d_ok, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + tl.arange(0, BLOCK_N)
        keys_ok = keys < lk
        k = _load_tile(k_base, keys, stride_k, keys_ok, d_ok, MASKED, EVEN_D, BLOCK_D)
        v = _load_tile(v_base, keys, stride_v, keys_ok, d_ok, MASKED, EVEN_D, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            visible = keys_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, softmax_scale, qk_scale,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_dot, stride_doh, stride_lh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    # Last query blocks first: under a causal mask they have the most keys to visit.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    q_start, lq, k_start, lk = _seq_bounds(CU_Q, CU_K, tl.program_id(2))
    if start_m >= lq:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_ok, d_ok = offs_m < lq, tl.arange(0, BLOCK_D) < HEAD_DIM
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    q = _load_tile(q_base, offs_m, stride_qt, rows_ok, d_ok, True, EVEN_D, BLOCK_D)
    do = _load_tile(DO + q_start.to(tl.int64) * stride_dot + h * stride_doh, offs_m,
                    stride_dot, rows_ok, d_ok, True, EVEN_D, BLOCK_D)
    lse, delta = _load_lse_delta(LSE, DELTA, h, stride_lh, q_start, offs_m, rows_ok)
    kvh = h // GROUP
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _key_range(start_m, lq, lk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full,
                    offs_m, lk - lq, lk, d_ok, qk_scale, CAUSAL, False, EVEN_D, BLOCK_N,
                    BLOCK_D, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full, hi,
                    offs_m, lk - lq, lk, d_ok, qk_scale, CAUSAL, True, EVEN_D, BLOCK_N,
                    BLOCK_D, PRECISION)
    offs = offs_m[:, None] * stride_qt + tl.arange(0, BLOCK_D)[None, :]
    tl.store(DQ + q_start.to(tl.int64) * stride_qt + h * stride_qh + offs,
             (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])


MAX_GRID_SEQS = 65535
"""CUDA's limit on the third grid dimension, which indexes the packed sequences."""
INT32_MAX = 2**31 - 1


def _check_launch_limits(seqs: PackedSeqs, q: torch.Tensor, k: torch.Tensor) -> None:
    """Limits of this kernel's indexing: one grid row per sequence, and in-sequence offsets
    (row * row stride, head * token count) in int32; sequence starts are 64-bit."""
    if seqs.num_seqs > MAX_GRID_SEQS:
        raise ValueError(
            f"cu_seqlens_q describes {seqs.num_seqs} sequences; the triton backend takes at "
            f"most {MAX_GRID_SEQS} per call (split the batch or use backend='torch')"
        )
    spans = (("q", seqs.max_len_q * q.shape[1] * q.shape[2]),
             ("k", seqs.max_len_k * k.shape[1] * k.shape[2]), ("lse", q.shape[0] * q.shape[1]))
    for name, extent in spans:
        if extent > INT32_MAX:
            raise ValueError(
                f"{name} spans {extent} elements within one sequence (or one lse row set); "
                f"the triton backend indexes that in int32 (<= {INT32_MAX}): split the "
                f"sequence (ring attention) or use backend='torch'"
            )


def _common(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    head_dim = q.shape[2]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        GROUP=q.shape[1] // k.shape[1],
        CAUSAL=causal,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def attention_forward(q, k, v, *, cu_seqlens_q, cu_seqlens_k, seqs: PackedSeqs, causal,
                      scale):
    """Validated inputs in, ``(out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32)`` out."""
    _check_launch_limits(seqs, q, k)
    q, k, v = (t.contiguous() for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device)
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    tiles = _tiles("fwd", q.shape[2], q.dtype)
    grid = (triton.cdiv(seqs.max_len_q, tiles.block_m), q.shape[1], seqs.num_seqs)
    _attn_fwd[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), **_common(q, k, causal),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out, lse


def _delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    num_tokens, num_heads, head_dim = out.shape
    delta = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=out.device)
    block_m = 16 if _interpreting() else 128
    _attn_bwd_delta[(triton.cdiv(num_tokens, block_m), num_heads)](
        out, dout, delta, num_tokens, out.stride(0), out.stride(1), dout.stride(0),
        dout.stride(1), delta.stride(0), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
    )
    return delta


def attention_backward(dout, q, k, v, out, lse, *, cu_seqlens_q, cu_seqlens_k,
                       seqs: PackedSeqs, causal, scale):
    """Validated inputs in, ``(dq, dk, dv)`` in the dtypes of ``q, k, v`` out."""
    _check_launch_limits(seqs, q, k)
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device)
    lse = lse.to(torch.float32).contiguous()
    delta = _delta(out, dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1), lse.stride(0))
    common = _common(q, k, causal)
    tiles = _tiles("dkdv", q.shape[2], q.dtype)
    grid = (triton.cdiv(seqs.max_len_k, tiles.block_n), k.shape[1], seqs.num_seqs)
    _attn_bwd_dkdv[grid](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, scale,
        scale * LOG2E, *strides, **common, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    tiles = _tiles("dq", q.shape[2], q.dtype)
    grid = (triton.cdiv(seqs.max_len_q, tiles.block_m), q.shape[1], seqs.num_seqs)
    _attn_bwd_dq[grid](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, scale, scale * LOG2E,
        *strides, **common, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return dq, dk, dv

