"""Plain single-device references for the kernels: the equations, materialized.

Attention (Vaswani et al. 2017, Eq. 1) per packed sequence:

    S = scale * Q K^T  (masked bottom-right when causal),  lse = logsumexp_j S,
    O = softmax(S) V,

with kv heads repeated for GQA; cross-entropy of ``hidden @ weight^T`` from full logits.
Memory is O(T^2) and O(T x V): these are the "naive" baselines of bench/kernel_speed.py and a
readable statement of what the tiled backends compute; autograd gives their gradients.
The tests keep their own independent copy (tests/kernels/reference.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.varlen import accumulation_dtype


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Tq, Hq, D], lse [Hq, Tq])`` computed in float32/float64; differentiable."""
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        qs = q[q0:q1].to(acc).transpose(0, 1)
        ks = k[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k1].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = scale * qs @ ks.transpose(1, 2)
        lq, lk = q1 - q0, k1 - k0
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            visible = visible.tril(diagonal=lk - lq)
        seen = visible.any(dim=1)
        # Rows with no visible key: finite dummy scores, then weight 0 (no NaN anywhere).
        scores = torch.where(visible | ~seen[:, None], scores, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1) * seen[:, None]
        outs.append((probs @ vs).transpose(0, 1))
        lses.append(torch.where(seen, lse, float("-inf")))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_valid)`` from the full ``[T, V]`` logits (the naive baseline)."""
    logits = (hidden @ weight.T).to(accumulation_dtype(hidden.dtype))
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()
