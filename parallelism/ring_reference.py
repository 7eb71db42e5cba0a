"""Single-process reference of zigzag ring attention: the ring loop simulated, plain torch.

Why: the distributed version interleaves communication, row gathers and block kernels;
this module is the same algorithm written as the equations, so a reader can check the
math and tests can check the simulation against full attention. No kernels, no comm.

Ring attention (Liu et al. 2310.01889, Li et al. 2105.13120): position i keeps its query
shard Q_i and sees the key/value shards of every position r, one per step
(r = i - s mod d at step s). For each block it computes the partial softmax attention

    O_b = softmax(Q_i K_r^T * scale + M_ir) V_r,     lse_b = log sum_k exp(Q_i K_r^T * scale + M_ir)

where M_ir is 0 where query and key are in the same sequence and (if causal) the key's
global position <= the query's, -inf elsewhere. Blocks combine exactly with the
log-sum-exp merge (the online softmax of Milakov & Gimelshein 1805.02867):

    lse = log(exp(lse_a) + exp(lse_b)),   O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b.

Everything is differentiable with autograd (the backward is autograd's), NaN-free for rows
that see no key in a block (O_b = 0, lse_b = -inf). Memory is O(T_local^2) per block, so
keep it to test sizes. GQA: kv head h serves query heads h*g .. h*g+g-1 (g = Hq / Hkv).

Legend: T tokens, H heads, D head dim; q_THD is [T, H, D].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from parallelism.zigzag import ZigzagLayout

__all__ = ["block_attention_reference", "lse_merge_reference", "ring_attention_reference"]


def block_attention_reference(
    q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention of one block: (out [Tq, Hq, D], lse [Hq, Tq])."""
    groups = q_THD.shape[1] // k_THD.shape[1]
    k_THD = k_THD.repeat_interleave(groups, dim=1)
    v_THD = v_THD.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q_THD, k_THD) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exactly 0 where masked
    denom = weights.sum(dim=-1, keepdim=True)
    seen = denom > 0
    denom_safe = torch.where(seen, denom, torch.ones_like(denom))
    lse = torch.where(seen, row_max + torch.log(denom_safe), -math.inf).squeeze(-1)
    out = torch.einsum("hqk,khd->qhd", weights / denom_safe, v_THD)
    return out, lse


def lse_merge_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """lse = log(e^lse_a + e^lse_b), out = e^(lse_a-lse) out_a + e^(lse_b-lse) out_b."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, top + torch.log(total_safe), -math.inf)
    # weights are [H, T]; outputs [T, H, D]
    out = (w_a.T[..., None] * out_a + w_b.T[..., None] * out_b) / total_safe.T[..., None]
    return out, lse


def _token_coords(layout: ZigzagLayout, ring_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, global position) of every token of a shard."""
    seq_ids = torch.repeat_interleave(
        torch.arange(len(layout.lengths)),
        torch.tensor(layout.local_lengths(ring_index), dtype=torch.int64),
    )
    return seq_ids, layout.position_ids(ring_index)


def ring_attention_reference(
    q_shards: Sequence[torch.Tensor],
    k_shards: Sequence[torch.Tensor],
    v_shards: Sequence[torch.Tensor],
    *,
    cu_seqlens: torch.Tensor | Sequence[int],
    causal: bool = True,
    softmax_scale: float | None = None,
) -> list[torch.Tensor]:
    """Outputs of every ring position, given every position's zigzag q/k/v shard.

    `cu_seqlens` describes the *global* packed batch; shard j is what zigzag_shard gave
    ring position j. Returns the output shards in ring order, in the inputs' dtype.
    """
    ring_size = len(q_shards)
    if not (len(k_shards) == len(v_shards) == ring_size) or ring_size == 0:
        raise ValueError(f"need one q, k and v shard per ring position, got {len(q_shards)}, "
                         f"{len(k_shards)}, {len(v_shards)}")
    layout = ZigzagLayout.from_cu_seqlens(cu_seqlens, ring_size)
    scale = softmax_scale if softmax_scale is not None else q_shards[0].shape[-1] ** -0.5
    coords = [_token_coords(layout, j) for j in range(ring_size)]
    outs = []
    for i in range(ring_size):
        seq_q, pos_q = coords[i]
        out = torch.zeros_like(q_shards[i])
        lse = torch.full(q_shards[i].shape[1::-1], -math.inf, dtype=q_shards[i].dtype,
                         device=q_shards[i].device)
        for step in range(ring_size):  # the KV block of position r arrives at step i - r
            r = (i - step) % ring_size
            seq_k, pos_k = coords[r]
            mask = seq_q[:, None] == seq_k[None, :]
            if causal:
                mask = mask & (pos_q[:, None] >= pos_k[None, :])
            out_b, lse_b = block_attention_reference(q_shards[i], k_shards[r], v_shards[r],
                                                     mask, scale)
            out, lse = lse_merge_reference(out, lse, out_b, lse_b)
        outs.append(out)
    return outs
