"""Kernels: attention with log-sum-exp (varlen, GQA, causal) and fused linear cross-entropy.

Each has a plain-torch backend that runs everywhere (float64 included) and a Triton backend
for CUDA; ``backend="auto"`` picks Triton on CUDA. kernels imports no other package.
"""

from kernels.attention import (
    attention,
    attention_with_lse,
    attention_with_lse_backward,
    resolve_backend,
)
from kernels.linear_ce import linear_cross_entropy
from kernels.lse_merge import merge_attention
from kernels.reference import attention_reference, linear_cross_entropy_reference
from kernels.varlen import accumulation_dtype, check_qkv

__all__ = [
    "accumulation_dtype",
    "attention",
    "attention_reference",
    "attention_with_lse",
    "attention_with_lse_backward",
    "check_qkv",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "merge_attention",
    "resolve_backend",
]
