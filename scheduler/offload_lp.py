"""MEMO's offload ratio: the largest alpha whose swap hides under compute and fits host memory.

MEMO (arXiv 2407.12117, Sec. 4.1, Eq. 1-2) swaps, per layer, the layer input and the
attention output always and a fraction alpha of the remaining saved activations' tokens,
recomputing the rest in backward. The small LP it solves per layer is

    maximise alpha  s.t.  (B_always + alpha * B_rest) / bw_pcie <= t_layer_forward   (overlap)
                          n_swapped * (B_always + alpha * B_rest) <= host_bytes      (host)
                          0 <= alpha <= 1

with one variable and two linear constraints, so its optimum is the closed form below (the
smaller of the two constraint's bounds, clamped to [0, 1]); no solver is needed. When even
alpha = 0 breaks the overlap constraint, the always-swapped tensors stall the forward;
`stall_s` reports by how much. Torch-free: the controller's planner imports this.

Bytes per token per layer follow workers.layers.DecoderLayer's saved tensors: always x and
the attention output (2H values) plus lse (Hq float32); the rest ~ normed inputs, pre- and
post-RoPE q/k, v, the residual h, its norm and four [F]-wide SwiGLU tensors
(5H + 4*Hkv*D + 4F values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scheduler.specs import ClusterSpec, ModelSpec


@dataclass(frozen=True, kw_only=True)
class OffloadSolution:
    """alpha and the figures that bound it."""

    alpha: float  # share of the remaining activations' tokens swapped (0..1)
    bound: Literal["time", "host", "none"]  # which constraint is tight ("none": alpha = 1)
    swap_s: float  # per-layer copy time at this alpha
    compute_s: float  # per-layer forward time the copy hides under
    host_bytes: float  # host memory used by all swapped layers at this alpha
    stall_s: float  # per-layer copy time not hidden (> 0 only when alpha = 0 still stalls)


def solve_offload_ratio(*, bytes_always: float, bytes_rest: float, layer_forward_s: float,
                        pcie_bandwidth_gbps: float, host_bytes: float,
                        num_swapped_layers: int) -> OffloadSolution:
    """The closed-form optimum of MEMO's per-layer LP (all quantities per layer)."""
    for name, value in (("bytes_always", bytes_always), ("bytes_rest", bytes_rest),
                        ("layer_forward_s", layer_forward_s), ("host_bytes", host_bytes)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if pcie_bandwidth_gbps <= 0:
        raise ValueError(f"pcie_bandwidth_gbps={pcie_bandwidth_gbps} must be > 0")
    if num_swapped_layers < 0:
        raise ValueError(f"num_swapped_layers={num_swapped_layers} must be >= 0")
    bw = pcie_bandwidth_gbps * 1e9
    rest = max(bytes_rest, 1e-30)
    by_time = (layer_forward_s * bw - bytes_always) / rest
    by_host = (host_bytes / max(num_swapped_layers, 1) - bytes_always) / rest
    alpha = min(1.0, max(0.0, min(by_time, by_host)))
    bound: Literal["time", "host", "none"] = \
        "none" if alpha >= 1.0 else ("time" if by_time <= by_host else "host")
    swap_bytes = bytes_always + alpha * bytes_rest
    stall = max(0.0, swap_bytes / bw - layer_forward_s) if alpha == 0 else 0.0  # alpha > 0 fits
    return OffloadSolution(alpha=alpha, bound=bound, swap_s=swap_bytes / bw,
                           compute_s=layer_forward_s,
                           host_bytes=swap_bytes * num_swapped_layers,
                           stall_s=stall)


def layer_activation_bytes(spec: ModelSpec, num_tokens: int) -> tuple[float, float]:
    """(always-swapped, rest) saved bytes of one layer for `num_tokens` tokens."""
    h, f, kv, b = spec.hidden_size, spec.ffn_hidden_size, spec.num_kv_heads * spec.head_dim, \
        spec.dtype_bytes
    always = num_tokens * (2 * h * b + spec.num_heads * 4)
    rest = num_tokens * (5 * h + 4 * kv + 4 * f) * b
    return float(always), float(rest)


def layer_forward_seconds(spec: ModelSpec, cluster: ClusterSpec, *, num_tokens: int,
                          mean_context: float) -> float:
    """Forward time of one layer: 2 FLOPs per weight per token + causal attention."""
    h, f, q, kv = spec.hidden_size, spec.ffn_hidden_size, spec.q_dim, spec.kv_dim
    dense = 2 * (2 * h * q + 2 * h * kv + 3 * h * f)
    attention = 4 * q * mean_context  # QK^T and PV over the visible keys
    return num_tokens * (dense + attention) / (cluster.achieved_tflops * 1e12)


def offload_ratio_for(spec: ModelSpec, cluster: ClusterSpec, *, num_tokens: int,
                      sequence_length: int, num_resident_layers: int = 1,
                      ranks_per_node: int | None = None) -> OffloadSolution:
    """alpha for a rank holding `num_tokens` tokens of sequences `sequence_length` long."""
    if num_tokens < 1 or sequence_length < 1:
        raise ValueError(f"num_tokens={num_tokens} and sequence_length={sequence_length} "
                         "must be >= 1")
    always, rest = layer_activation_bytes(spec, num_tokens)
    per_rank_host = cluster.host_memory_gib * 2**30 / (ranks_per_node or cluster.gpus_per_node)
    return solve_offload_ratio(
        bytes_always=always, bytes_rest=rest,
        layer_forward_s=layer_forward_seconds(spec, cluster, num_tokens=num_tokens,
                                              mean_context=sequence_length / 2),
        pcie_bandwidth_gbps=cluster.pcie_bandwidth_gbps, host_bytes=per_rank_host,
        num_swapped_layers=max(0, spec.num_layers - num_resident_layers))
