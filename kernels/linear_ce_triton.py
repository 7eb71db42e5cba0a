"""Triton kernel for one chunk of fused linear cross-entropy (CUDA; interpreter in tests).

Given a chunk of logits ``z [C, V]`` (in the inputs' dtype, straight out of the matmul),
one program per row computes, in float32,

    lse = log sum_v exp(z_v)     (online softmax over vocabulary blocks: Milakov &
                                  Gimelshein 2018; per-lane running max and sum),
    loss = lse - z_y             (0 for an ignored row),

and, if gradients are wanted, overwrites the row in place with dl/dz = softmax(z) -
onehot(y) (zeros for an ignored row), as Liger-Kernel does. The in-place write means the
chunk needs no second [C, V] buffer: peak memory is one chunk of logits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_chunk(LOGITS, TARGETS, LOSS, stride_row, num_classes, ignore_index,
              WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, num_classes, BLOCK_V):
        x = tl.load(row_ptr + v0 + offs, mask=v0 + offs < num_classes, other=float("-inf"))
        m_new = tl.maximum(m, x.to(tl.float32))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x.to(tl.float32) - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    target_logit = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        for v0 in range(0, num_classes, BLOCK_V):
            cols = v0 + offs
            in_row = cols < num_classes
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(row_ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=in_row)


def chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, write_grad: bool
) -> torch.Tensor:
    """Per-row float32 loss of ``logits [C, V]``; optionally ``logits`` becomes dl/dz."""
    assert logits.stride(1) == 1, "the kernel walks rows of contiguous logits"
    num_rows, num_classes = logits.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block_v = 64 if interpreting else min(4096, triton.next_power_of_2(num_classes))
    _ce_chunk[(num_rows,)](
        logits, targets.contiguous(), loss, logits.stride(0), num_classes, ignore_index,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=1 if interpreting else 8,
    )
    return loss
