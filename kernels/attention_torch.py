"""Tiled attention with log-sum-exp in plain torch: the backend for every device and dtype.

FlashAttention-2 (Dao 2023, arXiv 2307.08691) without a custom kernel. Per sequence, per
block of queries, keys are visited in blocks with the online softmax (Alg. 1):

    m_new = max(m, rowmax(S_j)),  l = e^{m - m_new} l + rowsum(e^{S_j - m_new}),
    O = e^{m - m_new} O + e^{S_j - m_new} V_j,   and at the end  O /= l,  lse = m + log l.

The backward (Alg. 2) recomputes P = exp(S - lse) per block from the supplied lse, with
delta = rowsum(dO * O):  dV += P^T dO,  dS = P * (dO V^T - delta),  dQ += dS K,
dK += dS^T Q (times the softmax scale). ``lse`` and ``out`` may be the *merged* values of
a ring step, so one call computes that step's contribution to the gradients.

Memory: one score tile of ``Hq x block_q x block_k`` in the accumulation dtype (float64 for
float64 inputs, float32 otherwise) plus float accumulators of the inputs' size; no
``T x T`` matrix ever exists. Fully masked key blocks (causal) are skipped.

GQA: q heads are laid out ``[Hkv, rows, D]`` with ``rows = tokens x group`` so a whole
group shares one batched matmul against its kv head (q head ``h`` reads kv head
``h // (Hq // Hkv)``).
"""

from __future__ import annotations

import torch

from kernels.varlen import PackedSeqs, accumulation_dtype

BLOCK_Q = 256
BLOCK_K = 512
NEG_INF = float("-inf")


def _group_rows(x_THD: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, Hq, D] -> [Hkv, T*G, D] with row r = token * G + g."""
    t, hq, d = x_THD.shape
    g = hq // num_kv_heads
    return x_THD.to(dtype).reshape(t, num_kv_heads, g, d).transpose(0, 1).reshape(
        num_kv_heads, t * g, d
    )


def _ungroup_rows(x_KRD: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of ``_group_rows``: [Hkv, T*G, D] -> [T, Hq, D]."""
    hkv, rows, d = x_KRD.shape
    g = rows // num_tokens
    return x_KRD.reshape(hkv, num_tokens, g, d).transpose(0, 1).reshape(num_tokens, hkv * g, d)


def _lse_rows(lse_HT: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq, T] -> [Hkv, T*G] in the same row order as ``_group_rows``."""
    hq, t = lse_HT.shape
    g = hq // num_kv_heads
    return lse_HT.reshape(num_kv_heads, g, t).transpose(1, 2).reshape(num_kv_heads, t * g)


def _causal_mask(
    i0: int, i1: int, j0: int, j1: int, group: int, diag: int, device: torch.device
) -> torch.Tensor:
    """Boolean [rows, keys] with True where query i (row // group) sees key j <= i + diag."""
    rows_i = torch.arange(i0, i1, device=device).repeat_interleave(group)
    keys = torch.arange(j0, j1, device=device)
    return keys[None, :] <= rows_i[:, None] + diag


def _visible_keys(i0: int, i1: int, lq: int, lk: int, causal: bool) -> tuple[int, int]:
    """Key range [0, end) some query in [i0, i1) sees, and the first key needing a mask."""
    if not causal:
        return lk, lk
    diag = lk - lq
    end = max(0, min(lk, i1 + diag))
    unmasked_end = max(0, min(lk, i0 + diag + 1))
    return end, unmasked_end


def _forward_seq(
    q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, *, causal: bool, scale: float,
    block_q: int, block_k: int, acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: returns out [lq, Hq, D] (acc dtype) and lse [Hq, lq]."""
    lq, hq, d = q_s.shape
    lk, hkv, _ = k_s.shape
    g = hq // hkv
    q_KRD = _group_rows(q_s, hkv, acc) * scale  # scores = (scale q) k^T
    k_KTD = k_s.to(acc).transpose(0, 1)
    v_KTD = v_s.to(acc).transpose(0, 1)
    out_KRD = torch.zeros_like(q_KRD)
    lse_KR = torch.full(q_KRD.shape[:2], NEG_INF, dtype=acc, device=q_s.device)
    for i0 in range(0, lq, block_q):
        i1 = min(lq, i0 + block_q)
        r0, r1 = i0 * g, i1 * g
        end, unmasked_end = _visible_keys(i0, i1, lq, lk, causal)
        qb = q_KRD[:, r0:r1]
        m = torch.full(qb.shape[:2], NEG_INF, dtype=acc, device=q_s.device)
        l = torch.zeros_like(m)
        o = torch.zeros_like(qb)
        for j0 in range(0, end, block_k):
            j1 = min(end, j0 + block_k)
            s = torch.bmm(qb, k_KTD[:, j0:j1].transpose(1, 2))
            if j1 > unmasked_end:
                mask = _causal_mask(i0, i1, j0, j1, g, lk - lq, q_s.device)
                s.masked_fill_(~mask, NEG_INF)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp gives 0.
            m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)
            p = s.sub_(m_safe[..., None]).exp_()
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            o = o.mul_(alpha[..., None]).baddbmm_(p, v_KTD[:, j0:j1])
            m = m_new
        seen = l > 0
        out_KRD[:, r0:r1] = o / torch.where(seen, l, 1.0)[..., None]
        lse_KR[:, r0:r1] = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), NEG_INF)
    lse_HT = lse_KR.reshape(hkv, lq, g).transpose(1, 2).reshape(hq, lq)
    return _ungroup_rows(out_KRD, lq), lse_HT


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seqs: PackedSeqs,
    causal: bool,
    scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs in, ``(out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32/64)`` out."""
    acc = accumulation_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=acc, device=q.device)
    for q0, q1, k0, k1 in seqs.spans():
        o_s, lse_s = _forward_seq(
            q[q0:q1], k[k0:k1], v[k0:k1],
            causal=causal, scale=scale, block_q=block_q, block_k=block_k, acc=acc,
        )
        out[q0:q1] = o_s.to(q.dtype)
        lse[:, q0:q1] = lse_s
    return out, lse


def _backward_seq(
    do_s: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor,
    o_s: torch.Tensor, lse_s: torch.Tensor, *, causal: bool, scale: float, block_q: int,
    block_k: int, acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence: returns dq [lq, Hq, D], dk, dv [lk, Hkv, D], all in acc dtype."""
    lq, hq, d = q_s.shape
    lk, hkv, _ = k_s.shape
    g = hq // hkv
    q_KRD = _group_rows(q_s, hkv, acc) * scale  # scores and dK both use scale * q
    do_KRD = _group_rows(do_s, hkv, acc)
    delta_KR = (do_KRD * _group_rows(o_s, hkv, acc)).sum(dim=-1)
    lse_KR = _lse_rows(lse_s.to(acc), hkv)
    # Rows that saw no key (lse = -inf) must give P = 0, not exp(-inf - -inf) = NaN.
    lse_KR = torch.where(lse_KR == NEG_INF, float("inf"), lse_KR)
    k_KTD = k_s.to(acc).transpose(0, 1)
    v_KTD = v_s.to(acc).transpose(0, 1)
    dq_KRD = torch.zeros_like(q_KRD)
    dk_KTD = torch.zeros_like(k_KTD)
    dv_KTD = torch.zeros_like(v_KTD)
    for i0 in range(0, lq, block_q):
        i1 = min(lq, i0 + block_q)
        r0, r1 = i0 * g, i1 * g
        end, unmasked_end = _visible_keys(i0, i1, lq, lk, causal)
        qb, dob = q_KRD[:, r0:r1], do_KRD[:, r0:r1]
        for j0 in range(0, end, block_k):
            j1 = min(end, j0 + block_k)
            kb, vb = k_KTD[:, j0:j1], v_KTD[:, j0:j1]
            s = torch.bmm(qb, kb.transpose(1, 2))
            if j1 > unmasked_end:
                mask = _causal_mask(i0, i1, j0, j1, g, lk - lq, q_s.device)
                s.masked_fill_(~mask, NEG_INF)
            p = s.sub_(lse_KR[:, r0:r1, None]).exp_()
            dv_KTD[:, j0:j1].baddbmm_(p.transpose(1, 2), dob)
            ds = torch.bmm(dob, vb.transpose(1, 2)).sub_(delta_KR[:, r0:r1, None]).mul_(p)
            dq_KRD[:, r0:r1].baddbmm_(ds, kb, alpha=scale)
            dk_KTD[:, j0:j1].baddbmm_(ds.transpose(1, 2), qb)
    return _ungroup_rows(dq_KRD, lq), dk_KTD.transpose(0, 1), dv_KTD.transpose(0, 1)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    seqs: PackedSeqs,
    causal: bool,
    scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated inputs in, ``(dq, dk, dv)`` in the dtypes of ``q, k, v`` out."""
    acc = accumulation_dtype(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for q0, q1, k0, k1 in seqs.spans():
        dq_s, dk_s, dv_s = _backward_seq(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1],
            causal=causal, scale=scale, block_q=block_q, block_k=block_k, acc=acc,
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = dq_s.to(q.dtype), dk_s.to(k.dtype), dv_s.to(v.dtype)
    return dq, dk, dv
