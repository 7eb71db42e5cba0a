"""Fused linear cross-entropy: sum_t CE(h_t W^T, y_t) without the [T, V] logits.

The LM head's logits are the largest activation of long-context training (T x V floats:
64K tokens x 128K vocabulary is 32 GiB in float32). StreamBP (arXiv 2506.03077, Sec. 3.2)
and Liger-Kernel compute the loss chunk by chunk of rows and fold the backward into the
same pass, since for z = h W^T and l = lse(z) - z_y:

    dl/dz = softmax(z) - onehot(y),   dl/dh = (dl/dz) W,   dl/dW = (dl/dz)^T h.

Per chunk of ``chunk_size`` rows we form the chunk's logits (float32 accumulation for
bf16/fp16/fp32 inputs, float64 for float64), its loss, and, when autograd needs them, its
contribution to dh (written once) and dW (accumulated in float32/float64). Peak extra
memory is O(chunk_size x V + T x H + V x H) instead of O(T x V). The backward only scales
the stored gradients by the incoming scalar.

On CUDA the per-chunk softmax/loss/gradient step is a Triton kernel
(kernels/linear_ce_triton.py: an online softmax over vocabulary blocks that overwrites the
logits with dl/dz in place); elsewhere it is plain torch. Ignored targets (``ignore_index``)
contribute neither loss nor gradient and are not counted in ``num_valid``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from kernels.varlen import accumulation_dtype

CHUNK_ELEMENTS_CUDA = 2**27
"""Default logits per chunk on CUDA (256 MiB in bf16): every chunk also reads and writes
the float32 dW accumulator (V x H), so chunks must be large enough for the chunk's matmuls
to dominate that traffic (1024 rows at V = 128K)."""
CHUNK_ELEMENTS_CPU = 2**25
"""Default logits per chunk elsewhere (128 MiB in float32); CPU matmuls are slow enough."""


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device) -> int:
    elements = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU
    rows = max(64, elements // max(1, vocab_size))
    return max(1, min(num_tokens, rows))


_warned_dw_fallback = False


def _accumulate_dw(dw: torch.Tensor, grad: torch.Tensor, h_c: torch.Tensor) -> None:
    """dw += grad^T h_c with float32 accumulation, in the GEMM epilogue where possible."""
    global _warned_dw_fallback
    if dw.dtype == grad.dtype:
        dw.addmm_(grad.T, h_c)
        return
    if dw.is_cuda:
        try:
            torch.addmm(dw, grad.T, h_c, out_dtype=dw.dtype, out=dw)
            return
        except (TypeError, RuntimeError) as err:  # torch < 2.8 or no such cuBLAS path
            if not _warned_dw_fallback:
                warnings.warn(f"addmm(out_dtype=float32) unavailable ({err}); dW accumulates "
                              "through a temporary (slower, same result)", stacklevel=3)
                _warned_dw_fallback = True
    dw += (grad.T @ h_c).to(dw.dtype)


def _validate(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None,
    backend: str,
) -> None:
    for name, t, dims in (("hidden", hidden, "[T, H]"), ("weight", weight, "[V, H]")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor {dims}, got {got}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, got "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(
            f"hidden and weight must share a floating dtype, got {hidden.dtype}, {weight.dtype}"
        )
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (hidden.shape[0],):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else targets
        raise ValueError(f"targets must have shape [T] = [{hidden.shape[0]}], got {shape}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"backend='triton' needs CUDA tensors, got device {hidden.device}")
    if backend == "triton" and hidden.dtype == torch.float64:
        raise ValueError("backend='triton' does not support float64; use backend='torch'")


def _check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """One device sync: the out-of-range test is reduced on the device first."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, got "
            f"{first} (and {int(bad.sum()) - 1} more out of range)"
        )


def _chunk_torch(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """Loss per row; if ``need_grad``, overwrite ``logits`` with dl/dz (0 for ignored rows)."""
    lse = torch.logsumexp(logits, dim=-1)
    tgt = torch.where(valid, targets, 0).long()
    target_logit = logits.gather(1, tgt[:, None])[:, 0]
    loss = torch.where(valid, lse - target_logit, 0.0)
    if need_grad:
        logits.sub_(lse[:, None]).exp_()
        logits[torch.arange(logits.shape[0], device=logits.device), tgt] -= 1.0
        logits.mul_(valid[:, None])
    return loss


def _run_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_size: int, backend: str, need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    acc = accumulation_dtype(hidden.dtype)
    num_tokens = hidden.shape[0]
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    use_triton = backend == "triton"
    if use_triton:
        from kernels import linear_ce_triton
    for c0 in range(0, num_tokens, chunk_size):
        c1 = min(num_tokens, c0 + chunk_size)
        h_c, t_c = hidden[c0:c1], targets[c0:c1]
        valid = t_c != ignore_index
        if use_triton:
            logits = hidden[c0:c1] @ weight.T  # input dtype; the kernel upcasts to float32
            loss = linear_ce_triton.chunk_loss_and_grad(
                logits, t_c, ignore_index=ignore_index, write_grad=need_dh or need_dw
            )
        else:
            logits = (h_c @ weight.T).to(acc)
            loss = _chunk_torch(logits, t_c, valid, need_dh or need_dw)
        loss_sum += loss.sum(dtype=acc)
        if need_dh or need_dw:
            grad = logits.to(hidden.dtype)
            if dh is not None:
                dh[c0:c1] = grad @ weight
            if dw is not None:
                _accumulate_dw(dw, grad, h_c)
    return loss_sum, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients are computed in the forward (dl/dz never outlives its chunk); the backward
    scales them in place by the incoming scalar, so no second copy of dW (V x H) exists.
    They are handed over once: a second backward (``retain_graph=True``) raises."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
        ignore_index: int, chunk_size: int, backend: str,
    ) -> torch.Tensor:
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, dh, dw = _run_chunks(
            hidden, weight, targets, ignore_index, chunk_size, backend, need_dh, need_dw
        )
        ctx.grads = (dh, dw.to(weight.dtype) if dw is not None else None)
        return loss_sum

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward already ran; its gradients are released "
                "after one backward (retain_graph=True is not supported)"
            )
        dh, dw = ctx.grads
        ctx.grads = None
        g_dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
        g_dw = dw.mul_(grad_loss.to(dw.dtype)) if dw is not None else None
        return g_dh, g_dw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, num_valid)`` of cross-entropy of ``hidden [T, H] @ weight[V, H]^T``.

    ``loss_sum`` is a differentiable scalar in float32 (float64 for float64 inputs) summed
    over rows whose target is not ``ignore_index``; ``num_valid`` is an int64 scalar tensor
    (no host sync), so callers can all-reduce both and divide by the global count.
    ``chunk_size`` rows of logits exist at a time (``None``: see ``default_chunk_size``).
    ``backend``: ``auto`` uses the Triton chunk kernel on CUDA, torch elsewhere.
    """
    _validate(hidden, weight, targets, chunk_size, backend)
    _check_targets(targets, weight.shape[0], ignore_index)
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and hidden.dtype != torch.float64 else "torch"
    size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    num_valid = (targets != ignore_index).sum()
    loss_sum = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, size, backend)
    return loss_sum, num_valid
