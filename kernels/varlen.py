"""Packed variable-length layout shared by every attention backend, and its validation.

Sequences are packed along the token axis and delimited by int32 prefix sums
(``cu_seqlens``), the layout flash-attn's varlen API uses: sequence ``b`` owns query rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.
Validation copies the two small ``cu_seqlens`` vectors to the host once (one device sync
per call); everything else stays on the tensors' device.

Causal masking is aligned bottom-right per sequence: query ``i`` of a sequence with ``lq``
queries and ``lk`` keys sees keys ``j <= i + (lk - lq)``. With ``lq == lk`` this is the usual
lower-triangular mask; with ``lq < lk`` the queries are the last ``lq`` positions of the
sequence (a ring-attention step against earlier keys); with ``lq > lk`` the first
``lq - lk`` queries see no key at all (output 0, log-sum-exp ``-inf``).

Legend for shape suffixes used across kernels/: T tokens (packed), H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True, kw_only=True)
class PackedSeqs:
    """Host copy of the sequence boundaries of one attention call."""

    cu_q: tuple[int, ...]
    """Prefix sums of query lengths; ``cu_q[0] == 0``, ``cu_q[-1] == Tq``."""
    cu_k: tuple[int, ...]
    """Prefix sums of key lengths; same number of sequences as ``cu_q``."""

    @property
    def num_seqs(self) -> int:
        return len(self.cu_q) - 1

    @property
    def max_len_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:], strict=False))

    @property
    def max_len_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:], strict=False))

    def spans(self) -> list[tuple[int, int, int, int]]:
        """``(q_start, q_end, k_start, k_end)`` per sequence."""
        return [
            (self.cu_q[b], self.cu_q[b + 1], self.cu_k[b], self.cu_k[b + 1])
            for b in range(self.num_seqs)
        ]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower accumulates (and reports lse) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_cu_seqlens(name: str, cu: object, total: int, tokens_name: str) -> tuple[int, ...]:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D with at least 2 entries (0 and the total), got shape "
            f"{tuple(cu.shape)}"
        )
    values = tuple(int(x) for x in cu.tolist())
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for b in range(len(values) - 1):
        if values[b + 1] <= values[b]:
            raise ValueError(
                f"{name} must be strictly increasing (every sequence length >= 1), got "
                f"{name}[{b}]={values[b]} and {name}[{b + 1}]={values[b + 1]}"
            )
    if values[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the number of packed tokens {tokens_name}={total}, "
            f"got {values[-1]}"
        )
    return values


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [Tq, Hq, D], k and v [Tk, Hkv, D]: floating, one dtype and device, Hq % Hkv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor [T, H, D], got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"k head dim must equal q head dim {q.shape[2]}, got k shape {tuple(k.shape)}"
        )
    if q.shape[2] == 0 or k.shape[1] == 0:
        raise ValueError(f"head dim and head counts must be >= 1, got q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q heads Hq={q.shape[1]} must be a multiple of k/v heads Hkv={k.shape[1]} (GQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")


def validate_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    backend: str,
) -> tuple[PackedSeqs, float]:
    """Check a forward call; return the host boundaries and the resolved softmax scale."""
    check_qkv(q, k, v)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q.shape[0]")
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k.shape[0]")
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{len(cu_q) - 1} and {len(cu_k) - 1}"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"backend must be one of {SUPPORTED_BACKENDS}, got {backend!r}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(q.shape[2])
    else:
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    return PackedSeqs(cu_q=cu_q, cu_k=cu_k), scale


def validate_backward_extras(
    dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Shapes of the tensors only the backward takes."""
    for name, t in (("dout", dout), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {shape}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    expected = (q.shape[1], q.shape[0])
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != expected:
        shape = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must have shape [Hq, Tq] = {list(expected)}, got {shape}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse must be float32 or float64, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device {q.device}, got {lse.device}")
