"""Cost model: how long a group of sequences takes on a ring of d ranks, and what fits.

Time of one sequence of length s on a ring of d ranks (zigzag split, so every member does
the same work), following ByteScale (arXiv 2502.21231, section 4) which profiles
T(s) = a s^2 + b s + c:

    compute(s, d)  = (a s^2 + b s) / d
        a = 6 L h / F          causal attention, forward 2 L h s^2 FLOPs, x3 for fwd+bwd
        b = 6 P_matmul / F     every matmul (q, k, v, o, SwiGLU, LM head), x3 for fwd+bwd
    ring step      = the d-1 KV hand-offs of ring attention (Li et al., 2105.13120):
        comm_step  = 3 L kv_bytes (s/d) / bandwidth   (fwd: KV; bwd: KV and dKV)
        attn_step  = a s^2 / d^2                      (the block it overlaps with)
        exposed    = (d-1) max(0, comm_step - attn_step)
    offload        = r (s/d) act_bytes copied to host in forward and back in backward over
                     PCIe; exposed when a copy outlasts the compute it overlaps
                     (forward = 1/3, backward = 2/3 of compute)

and c is a fixed overhead per group per micro-batch (launches, ring set-up). `a`, `b`,
`c` start from FLOP counts and the cluster's achieved TFLOP/s; `update(observations)`
refits them by least squares on measured group times, as ByteScale profiles them.

Memory: a rank holds `capacity_tokens` tokens of activations per micro-batch. It is
derived from the device memory left after ZeRO-3-sharded model states (16 bytes per
parameter: bf16/fp32 weights and grads, fp32 Adam moments, sharded over all ranks because
the HDP data-parallel group is the whole world) divided by the activation bytes per token.
That last figure is injectable (`activation_bytes_per_token`), so the MEMO memory planner
can replace the default estimate (Korthikanti et al. 2022, Eq. 2 with flash attention:
34 h bytes per token per layer in 16-bit) with its planned peak per token; it does so by
default for every model with a stored memory profile (scheduler/memory_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.memory_model import planned_bytes_per_token_or_none
from scheduler.specs import ClusterSpec, ModelSpec

GIB = 1024**3
STATE_BYTES_PER_PARAM = 16  # weights + grads + two Adam moments, mixed precision
DEFAULT_MEMORY_FRACTION = 0.9  # the rest goes to allocator slack, NCCL buffers, workspaces
LAUNCH_S_PER_LAYER = 1e-4  # rough fixed cost per layer per group (fwd+bwd launches)


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One measured group: the sequences it ran, on how many ranks, and how long it took."""

    lengths: tuple[int, ...]  # whole sequence lengths the group ran
    ring_size: int = 1  # ranks of the group (1: a packed rank)
    seconds: float  # measured wall time of the group's forward+backward

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"Observation.lengths={self.lengths!r} must be non-empty, all >= 1")
        if self.ring_size < 1:
            raise ValueError(f"Observation.ring_size={self.ring_size} must be >= 1")
        if not (self.seconds >= 0 and math.isfinite(self.seconds)):
            raise ValueError(f"Observation.seconds={self.seconds} must be finite and >= 0")


@dataclass(frozen=True, kw_only=True)
class SeqCost:
    """Per-rank time of one sequence on its ring, split by cause (seconds)."""

    compute_s: float
    exposed_comm_s: float
    exposed_offload_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.exposed_offload_s


def as_observation(item) -> Observation:
    """Accept an Observation, a dict, (lengths, seconds) or (lengths, ring_size, seconds)."""
    if isinstance(item, Observation):
        return item
    if isinstance(item, dict):
        return Observation(lengths=tuple(int(x) for x in item["lengths"]),
                           ring_size=int(item.get("ring_size", 1)),
                           seconds=float(item["seconds"]))
    if len(item) == 2:
        lengths, seconds = item
        ring = 1
    elif len(item) == 3:
        lengths, ring, seconds = item
    else:
        raise ValueError(f"observation {item!r}: expected (lengths, seconds) or "
                         "(lengths, ring_size, seconds)")
    if isinstance(lengths, int | np.integer):
        lengths = (lengths,)
    return Observation(lengths=tuple(int(x) for x in lengths), ring_size=int(ring),
                       seconds=float(seconds))


class CostModel:
    """Step-time and memory figures of one model on one cluster (see module docstring)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, *,
                 activation_bytes_per_token: float | None = None,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION):
        if activation_bytes_per_token is not None and not activation_bytes_per_token > 0:
            raise ValueError(f"activation_bytes_per_token={activation_bytes_per_token} must be "
                             "> 0 (bytes of activations one token keeps alive, all layers)")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction={memory_fraction} must be in (0, 1]")
        self.model = model
        self.cluster = cluster
        self.memory_fraction = memory_fraction
        self.activation_bytes_per_token = float(
            activation_bytes_per_token or planned_bytes_per_token_or_none(model)
            or default_activation_bytes_per_token(model))
        flops = cluster.achieved_tflops * 1e12
        L = model.num_layers
        self.a = 6.0 * L * model.q_dim / flops  # seconds per token^2 (attention)
        self.b = 6.0 * matmul_params(model) / flops  # seconds per token (matmuls)
        self.c = LAUNCH_S_PER_LAYER * L  # seconds per group
        # Ring traffic per token held: K and V in forward, K, V, dK, dV in backward.
        kv_bytes = 2 * model.num_kv_heads * model.head_dim * model.dtype_bytes
        self.ring_bytes_per_token = 3.0 * L * kv_bytes

    def __repr__(self) -> str:
        return (f"CostModel(a={self.a:.3e}, b={self.b:.3e}, c={self.c:.3e}, "
                f"activation_bytes_per_token={self.activation_bytes_per_token:.0f})")

    # -- memory -------------------------------------------------------------------------
    def capacity_tokens(self, world_size: int) -> int:
        """Tokens of activations one rank can hold per micro-batch (ZeRO-3 states)."""
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        usable = self.cluster.gpu_memory_gib * GIB * self.memory_fraction
        states = STATE_BYTES_PER_PARAM * self.model.num_params / world_size
        tokens = math.floor((usable - states) / self.activation_bytes_per_token)
        if tokens < 1:
            raise ValueError(
                f"capacity_tokens: model states ({states / GIB:.1f} GiB per rank over "
                f"{world_size} ranks) leave no room in gpu_memory_gib="
                f"{self.cluster.gpu_memory_gib}; use more ranks or pass capacity_tokens")
        return tokens

    def host_capacity_tokens(self) -> int:
        """Tokens of offloaded activations one rank can park in host memory."""
        per_rank = self.cluster.host_memory_gib * GIB / self.cluster.gpus_per_node
        return int(per_rank * self.memory_fraction / self.activation_bytes_per_token)

    def hidden_offload_ratio(self, length: int) -> float:
        """Largest offload ratio whose copy hides behind forward compute (ByteScale Eq. 3).

        r (s/d) act / pcie <= (a s^2 + b s) / (3 d)  =>  r <= pcie (a s + b) / (3 act);
        the ring size cancels, so the bound is a property of the sequence alone.
        """
        pcie = self.cluster.pcie_bandwidth_gbps * 1e9
        return min(1.0, pcie * (self.a * length + self.b) / (3 * self.activation_bytes_per_token))

    # -- time ---------------------------------------------------------------------------
    def compute_s(self, length: float, ring_size: int = 1) -> float:
        """Per-rank forward+backward compute of one sequence split over `ring_size` ranks."""
        return (self.a * length * length + self.b * length) / ring_size

    def seq_cost(self, length: int, ring_size: int, *, bandwidth_gbps: float,
                 offload_ratio: float = 0.0) -> SeqCost:
        """Per-rank time of one sequence on a ring whose slowest link has `bandwidth_gbps`."""
        d = ring_size
        compute = self.compute_s(length, d)
        exposed = 0.0
        if d > 1:
            comm_step = self.ring_bytes_per_token * (length / d) / (bandwidth_gbps * 1e9)
            attn_step = self.a * length * length / (d * d)
            exposed = (d - 1) * max(0.0, comm_step - attn_step)
        offload = 0.0
        if offload_ratio > 0:
            copy = offload_ratio * (length / d) * self.activation_bytes_per_token
            copy_s = copy / (self.cluster.pcie_bandwidth_gbps * 1e9)
            offload = max(0.0, copy_s - compute / 3) + max(0.0, copy_s - 2 * compute / 3)
        return SeqCost(compute_s=compute, exposed_comm_s=exposed, exposed_offload_s=offload)

    def seq_time(self, length: int, ring_size: int, *, bandwidth_gbps: float,
                 offload_ratio: float = 0.0) -> float:
        return self.seq_cost(length, ring_size, bandwidth_gbps=bandwidth_gbps,
                             offload_ratio=offload_ratio).total_s

    def single_rank_times(self, lengths: np.ndarray, offload_ratios: np.ndarray) -> np.ndarray:
        """`seq_time(s, 1, offload_ratio=r)` for many sequences at once (no ring traffic)."""
        s = np.asarray(lengths, dtype=np.float64)
        compute = self.a * s * s + self.b * s
        copy_s = (np.asarray(offload_ratios, dtype=np.float64) * s
                  * self.activation_bytes_per_token / (self.cluster.pcie_bandwidth_gbps * 1e9))
        return (compute + np.maximum(0.0, copy_s - compute / 3)
                + np.maximum(0.0, copy_s - 2 * compute / 3))

    def group_time(self, lengths: Sequence[int], ring_size: int, *, bandwidth_gbps: float,
                   offload_ratios: Sequence[float] | None = None) -> float:
        """A group's per-rank time: c plus every sequence it runs (varlen packing)."""
        ratios = offload_ratios or [0.0] * len(lengths)
        return self.c + sum(self.seq_time(s, ring_size, bandwidth_gbps=bandwidth_gbps,
                                          offload_ratio=r)
                            for s, r in zip(lengths, ratios, strict=True))

    def max_hidden_ring(self, length: int, *, bandwidth_gbps: float) -> int:
        """Largest ring whose KV hand-off still hides behind the attention block (>= 1).

        attn_step >= comm_step  <=>  d <= a s bandwidth / ring_bytes_per_token.
        """
        d = self.a * length * bandwidth_gbps * 1e9 / self.ring_bytes_per_token
        return max(1, int(math.floor(d)))

    # -- refit --------------------------------------------------------------------------
    def update(self, observations: Iterable) -> CostModel:
        """Refit a, b, c by non-negative least squares on measured group times.

        Each observation is (lengths, seconds), (lengths, ring_size, seconds), a dict with
        those keys or an `Observation`; the model fitted is
        seconds = a sum(s^2)/d + b sum(s)/d + c. Needs three observations whose features
        are not collinear. Returns self (coefficients are replaced in place).
        """
        obs = [as_observation(o) for o in observations]
        if len(obs) < 3:
            raise ValueError(f"observations: {len(obs)} given, need >= 3 to fit a, b, c")
        X = np.array([[sum(s * s for s in o.lengths) / o.ring_size,
                       sum(o.lengths) / o.ring_size, 1.0] for o in obs], dtype=np.float64)
        y = np.array([o.seconds for o in obs], dtype=np.float64)
        if np.linalg.matrix_rank(X / np.maximum(np.abs(X).max(axis=0), 1e-300)) < 3:
            raise ValueError("observations: need at least three distinct token profiles "
                             "(different sum(s^2) and sum(s)) to fit a, b and c")
        self.a, self.b, self.c = (float(v) for v in nonneg_lstsq(X, y))
        return self


def nonneg_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0, exact for a few columns: the optimum is the unconstrained
    fit on its own support, so try every support and keep the best non-negative one."""
    n = X.shape[1]
    scale = np.maximum(np.abs(X).max(axis=0), 1e-300)  # columns differ by ~1e12
    Xs = X / scale
    best, best_err = np.zeros(n), float(np.sum(y * y))
    for mask in range(1, 2**n):
        cols = [j for j in range(n) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(Xs[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        err = float(np.sum((Xs[:, cols] @ sol - y) ** 2))
        if err < best_err - 1e-18 * max(1.0, best_err):
            best = np.zeros(n)
            best[cols] = sol
            best_err = err
    return best / scale


def matmul_params(model: ModelSpec) -> int:
    """Parameters that take part in a matmul per token (all but embedding and norms)."""
    h, q, kv = model.hidden_size, model.q_dim, model.kv_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * model.ffn_hidden_size
    return model.num_layers * per_layer + model.vocab_size * h


def default_activation_bytes_per_token(model: ModelSpec) -> float:
    """Korthikanti et al. 2022 Eq. 2 (no recompute, flash attention): 34 h bytes per token
    per layer at 16 bits, scaled by the model's dtype width."""
    return 34.0 * model.hidden_size * model.num_layers * model.dtype_bytes / 2
