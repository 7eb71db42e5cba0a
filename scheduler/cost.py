"""Cost model: how long a group of sequences takes on a ring of d ranks, and what fits.

It charges what the executor does (scheduler/work.py counts it exactly; the fidelity
tests hold those counts to FlopCounterMode and RingComm's counters). Per rank, for one
sequence of length s on a ring of d ranks (zigzag split, so every member does the same
work), following ByteScale's profiled form T(s) = a s^2 + b s + c (arXiv 2502.21231,
section 4):

    compute(s, d) = (a s^2 + b s) / d
        a = 7 L h / F        causal attention: forward 4 h per (query, key) pair, the
                             FlashAttention-2 backward 10 h (it recomputes P), s^2 / 2 pairs
        b = (6 P_matmul + 7 L h B) / F
                             every projection and the LM head (forward 2, backward 4 per
                             weight), plus the kernel's diagonal tiles: a block of B queries
                             sees all keys up to its last query (B = 256, +s B / 2 pairs);
                             objective dpo adds its no-grad head pass, 2 h V per token
    memory scheme (the group's, scheduler/plan.py GroupMemory):
        offload    MEMO: + 2 P_layer (L - 1)(1 - alpha) s / d of recompute / F, and the
                   host copies (x, o, lse and alpha of the saved activations of every
                   swapped layer) over PCIe, exposed where a copy outlasts the compute it
                   overlaps (forward 1/3, backward 2/3)
        streambp   layer-wise StreamBP: + one forward of every layer (2 P_layer L s) and
                   the chunked attention (forward + backward per query chunk instead of
                   one backward)
    ring (Li et al. 2105.13120; parallelism/ring_attention.py), per layer and ring step:
        forward:  a KV block (2 Hkv D cb s / d bytes) hides behind the step's attention
                  forward (2 h s^2 / d^2 / F); backward: the KV block plus the dK/dV
                  accumulator (float32, 2 Hkv D acc s / d bytes) behind the step's
                  attention backward (5 h s^2 / d^2 / F); d - 1 forward and d - 1 backward
                  steps, and the accumulator's last hop home is never hidden

and c is a fixed overhead per group per micro-batch (launches, ring set-up). Per step,
after every rank's last micro-batch: the optimizer's collectives
(scheduler/model_states.py `step_collectives`: ring algorithms over the world's slowest
link) and the AdamW update (bytes of masters, moments, gradients and compute parameters
the rank touches, at the device's memory bandwidth): `step_overhead_s`.

`a`, `b`, `c` start from FLOP counts and the cluster's achieved TFLOP/s;
`update(observations)` refits them by least squares on measured group times, as
ByteScale profiles them.

Memory (scheduler/rank_memory.py): model states for the job's precision and optimizer
sharding, plus each scheme's activation peak from the model's MEMO profile.
`capacity_tokens` is the most tokens a rank holds under the plain scheme;
`offload_capacity_tokens` under MEMO offload.

Ranks of different speeds (node pools, a throttled GPU: docs/planner.md, "Rank speeds"):
the model describes the reference rank (the cluster's `achieved_tflops`); `at_speed(v)`
is the same model for a rank v times as fast: compute, recompute and the fixed cost c
take 1/v as long, the bandwidths do not change (so a slower rank hides more of its ring
traffic). A group runs at its slowest member's speed. In a cluster of node pools each
rank's memory is its own pool's (`rank_memory`, `rank_capacity_tokens`); `memory` and
`capacity_tokens` are what every rank can count on (the smallest pool's figures).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.model_states import has_masters, master_dtype, step_collectives
from scheduler.offload_lp import solve_offload_ratio
from scheduler.rank_memory import DEFAULT_MEMORY_FRACTION, GIB, RankMemory  # noqa: F401
from scheduler.specs import DTYPE_BYTES, ClusterSpec, ModelSpec
from scheduler.work import (
    ATTENTION_BLOCK_Q,
    NUM_RESIDENT_LAYERS,
    PLAIN,
    Scheme,
    accumulation_bytes,
    check_objective,
    head_flops_per_token,
    layer_matmul_params,
)

LAUNCH_S_PER_LAYER = 1e-4  # rough fixed cost per layer per group (fwd+bwd launches)
STREAM_CHUNK_TOKENS = 4096  # the query chunk the planner gives layer-wise StreamBP


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
    recompute_s: float = 0.0  # extra forward compute of the memory scheme

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + self.exposed_comm_s + self.exposed_offload_s


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
    """Step-time and memory figures of one model on one cluster (see module docstring).

    `precision` and `optimizer_sharding` default to what the model's dtype implies
    (bfloat16: bf16-mixed) and to `distributed` on more than one rank.
    """

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, *, precision: str | None = None,
                 optimizer_sharding: str | None = None,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                 memory: RankMemory | None = None, objective: str = "pretrain",
                 shard_mirror: bool = False):
        self.model = model
        self.objective = check_objective(objective)  # its loss head (scheduler.work)
        self.cluster = cluster
        self.memory = memory or RankMemory(model, cluster, precision=precision,
                                           optimizer_sharding=optimizer_sharding,
                                           memory_fraction=memory_fraction,
                                           shard_mirror=shard_mirror)
        self.memory_fraction = self.memory.memory_fraction
        # shard mirrors asked for: other world sizes (_memory_for) keep them where they apply
        self._mirror_asked = shard_mirror or self.memory.shard_mirror
        self.flops_per_s = cluster.achieved_tflops * 1e12
        L, h_attn = model.num_layers, model.num_heads * model.head_dim
        self.p_layer = layer_matmul_params(model)
        self.a = 7.0 * L * h_attn / self.flops_per_s  # seconds per token^2 (attention)
        # seconds per token (projections, head, diagonal tiles; dpo's extra head pass)
        head_extra = head_flops_per_token(model, objective) - head_flops_per_token(model)
        self.b = (6.0 * matmul_params(model) + head_extra
                  + 7.0 * L * h_attn * ATTENTION_BLOCK_Q) / self.flops_per_s
        self.c = LAUNCH_S_PER_LAYER * L  # seconds per group
        self.prior = (self.a, self.b, self.c)  # the FLOP-count figures, before any refit
        cb = self.memory.activations.cb
        row = 2 * model.num_kv_heads * model.head_dim  # K and V values per token
        self.kv_bytes_per_token = float(L * row * cb)  # one KV hand-off, every layer
        self.dkv_bytes_per_token = float(L * row * accumulation_bytes(self.memory.dtype))
        self._seq_costs: dict[tuple, SeqCost] = {}
        self._at_speed: dict[float, CostModel] = {}
        self._pool_memory: dict[tuple[int, int], RankMemory] = {}

    @property
    def precision(self) -> str:
        return self.memory.precision

    @property
    def optimizer_sharding(self) -> str:
        return self.memory.sharding

    @property
    def ring_bytes_per_token(self) -> float:
        """Bytes a ring member sends per token it holds and per ring step (forward KV,
        backward KV and dK/dV), all layers: the figure ring sizing trades against compute."""
        return 2 * self.kv_bytes_per_token + self.dkv_bytes_per_token

    def __repr__(self) -> str:
        return (f"CostModel(a={self.a:.3e}, b={self.b:.3e}, c={self.c:.3e}, "
                f"precision={self.precision}, optimizer_sharding={self.optimizer_sharding})")

    # -- memory -------------------------------------------------------------------------
    def _memory_for(self, world_size: int | None) -> RankMemory:
        if world_size is None or world_size == self.memory.world_size:
            return self.memory
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        return RankMemory(self.model, self.cluster, precision=self.memory.precision,
                          optimizer_sharding=self.memory.sharding, world_size=world_size,
                          memory_fraction=self.memory_fraction,
                          shard_mirror=self._mirror_asked)

    def capacity_tokens(self, world_size: int | None = None) -> int:
        """Tokens one rank can hold per micro-batch under the plain scheme.

        Raises DeviceMemoryError (a ValueError) naming the bytes needed and available when
        the model states alone do not fit, or when not even one token does."""
        mem = self._memory_for(world_size)
        mem.check_states_fit()
        tokens = mem.capacity_tokens(PLAIN)
        if tokens < 1:
            from scheduler.errors import DeviceMemoryError
            raise DeviceMemoryError(
                f"capacity_tokens: model states ({mem.states.total} bytes per rank) leave "
                f"{mem.room_bytes} bytes of the {mem.budget_bytes}-byte device budget "
                f"(gpu_memory_gib={self.cluster.gpu_memory_gib}), less than one token's "
                "activations", needed_bytes=mem.states.total + mem.activations.peak_bytes(1),
                available_bytes=mem.budget_bytes)
        return tokens

    def rank_memory(self, rank: int, world_size: int | None = None) -> RankMemory:
        """The memory model of one rank: its pool's figures in a cluster of node pools,
        else `memory` (for `world_size` ranks, default the cluster's)."""
        if not self.cluster.heterogeneous:
            return self._memory_for(world_size)
        pool = self.cluster.pool_of(rank)
        n = world_size or self.memory.world_size
        if (pool, n) not in self._pool_memory:
            self._pool_memory[pool, n] = RankMemory(
                self.model, self.cluster.pool_cluster(pool), precision=self.memory.precision,
                optimizer_sharding=self.memory.sharding, world_size=n,
                memory_fraction=self.memory_fraction, shard_mirror=self._mirror_asked)
        return self._pool_memory[pool, n]

    def rank_capacity_tokens(self, world_size: int | None = None) -> list[int]:
        """`capacity_tokens` of each of the first `world_size` ranks, from its own pool's
        device memory (all equal on a uniform cluster)."""
        n = world_size or self.memory.world_size
        if not self.cluster.heterogeneous:
            return [self.capacity_tokens(world_size)] * n
        self.capacity_tokens(world_size)  # the smallest pool: raises when nothing fits
        return [self.rank_memory(r, n).capacity_tokens(PLAIN) for r in range(n)]

    def at_speed(self, speed: float) -> CostModel:
        """This model for a rank `speed` times as fast as the reference (module docstring):
        a, b, c over speed, achieved FLOP/s times speed, bandwidths and memory unchanged.
        Cached per speed; `update` clears the cache."""
        if speed == 1.0:
            return self
        if not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed={speed} must be finite and > 0")
        hit = self._at_speed.get(speed)
        if hit is None:
            hit = copy.copy(self)
            hit.a, hit.b, hit.c = self.a / speed, self.b / speed, self.c / speed
            hit.flops_per_s = self.flops_per_s * speed
            hit._seq_costs, hit._at_speed = {}, {}
            self._at_speed[speed] = hit
        return hit

    def offload_capacity_tokens(self) -> int:
        """Tokens one rank can hold per micro-batch under MEMO offload (device and host)."""
        return self.memory.offload_capacity_tokens()

    def memo_alpha(self, num_tokens: float, length: int) -> float:
        """MEMO's offload ratio for a rank holding `num_tokens` of `length`-long sequences:
        the largest alpha whose copies hide under a layer's forward and fit the host."""
        act, L = self.memory.activations, self.model.num_layers
        swapped = max(1, L - NUM_RESIDENT_LAYERS)
        t = max(1, int(num_tokens))
        always = (act.x + act.o + act.lse) * t
        rest = act.host_bytes(t, Scheme(name="offload", offload_ratio=1.0)) / swapped - always
        layer_forward = (self.a * length * t / 2 + self.b * t) / (3 * L)  # a s t / 2: pairs
        solution = solve_offload_ratio(
            bytes_always=always, bytes_rest=max(rest, 0.0), layer_forward_s=layer_forward,
            pcie_bandwidth_gbps=self.cluster.pcie_bandwidth_gbps,
            host_bytes=self.memory.host_budget_bytes, num_swapped_layers=swapped)
        return math.floor(solution.alpha * 1e6) / 1e6

    # -- time ---------------------------------------------------------------------------
    def compute_s(self, length: float, ring_size: int = 1) -> float:
        """Per-rank forward+backward compute of one sequence split over `ring_size` ranks."""
        return (self.a * length * length + self.b * length) / ring_size

    def recompute_s(self, length: float, ring_size: int, scheme: Scheme) -> float:
        """Extra compute the memory scheme adds to one sequence on one rank."""
        t = length / ring_size
        L = self.model.num_layers
        if scheme.name == "offload":
            swapped = max(0, L - NUM_RESIDENT_LAYERS)
            return 2 * self.p_layer * swapped * (1 - scheme.offload_ratio) * t / self.flops_per_s
        if scheme.name == "streambp":
            c = scheme.chunk_tokens or STREAM_CHUNK_TOKENS
            # the chunked attention: forward once, then per chunk forward + backward over
            # about s^2 / 2 + s c / 2 pairs, in place of one backward over s^2 / 2
            chunk_pairs = t * t / 2 + t * min(c, t) / 2
            extra_attn = 4 * L * self.model.num_heads * self.model.head_dim * chunk_pairs
            return (2 * self.p_layer * L * t + extra_attn) / self.flops_per_s
        return 0.0

    def exposed_comm_s(self, length: float, ring_size: int, bandwidth_gbps: float) -> float:
        """Ring transfers not hidden behind the attention block they overlap (module doc)."""
        d = ring_size
        if d <= 1:
            return 0.0
        bw, t = bandwidth_gbps * 1e9, length / d
        kv, dkv = self.kv_bytes_per_token * t / bw, self.dkv_bytes_per_token * t / bw
        block = self.a * t * t / 7  # h L t^2 / F: attention of one half block per unit
        forward = (d - 1) * max(0.0, kv - 2 * block)
        backward = (d - 1) * max(0.0, kv + dkv - 5 * block)
        return forward + backward + dkv

    def exposed_offload_s(self, length: float, ring_size: int, scheme: Scheme,
                          compute_s: float) -> float:
        """Host copies not hidden: forward copies behind 1/3 of the compute, backward
        prefetches behind the other 2/3 (and the recompute)."""
        host = self.memory.activations.host_bytes(max(1, round(length / ring_size)), scheme)
        if host == 0:
            return 0.0
        copy_s = host / (self.cluster.pcie_bandwidth_gbps * 1e9)
        return max(0.0, copy_s - compute_s / 3) + max(0.0, copy_s - 2 * compute_s / 3)

    def scheme_for(self, length: int, ring_size: int, offload_ratio: float) -> Scheme:
        """The scheme the planner gives a sequence that needs `offload_ratio` of its
        tokens' memory freed (the sharding's token rule): plain at 0, else MEMO offload
        at the alpha that hides its copies."""
        if offload_ratio <= 0:
            return PLAIN
        return Scheme(name="offload", offload_ratio=self.memo_alpha(length / ring_size, length))

    def seq_cost(self, length: int, ring_size: int, *, bandwidth_gbps: float,
                 offload_ratio: float = 0.0, scheme: Scheme | None = None) -> SeqCost:
        """Per-rank time of one sequence on a ring whose slowest link has `bandwidth_gbps`,
        under `scheme` (default: `scheme_for(offload_ratio)`). Memoised: the balance
        scheduler asks for the same (length, ring) many times; `update` clears it."""
        key = (length, ring_size, bandwidth_gbps, offload_ratio, scheme)
        hit = self._seq_costs.get(key)
        if hit is None:
            hit = self._seq_costs[key] = self._seq_cost(length, ring_size, bandwidth_gbps,
                                                         offload_ratio, scheme)
        return hit

    def _seq_cost(self, length: int, ring_size: int, bandwidth_gbps: float,
                  offload_ratio: float, scheme: Scheme | None) -> SeqCost:
        scheme = scheme or self.scheme_for(length, ring_size, offload_ratio)
        compute = self.compute_s(length, ring_size)
        recompute = self.recompute_s(length, ring_size, scheme)
        return SeqCost(compute_s=compute, recompute_s=recompute,
                       exposed_comm_s=self.exposed_comm_s(length, ring_size, bandwidth_gbps),
                       exposed_offload_s=self.exposed_offload_s(length, ring_size, scheme,
                                                                compute + recompute))

    def seq_time(self, length: int, ring_size: int, *, bandwidth_gbps: float,
                 offload_ratio: float = 0.0, scheme: Scheme | None = None) -> float:
        return self.seq_cost(length, ring_size, bandwidth_gbps=bandwidth_gbps,
                             offload_ratio=offload_ratio, scheme=scheme).total_s

    def seq_times(self, lengths: np.ndarray, ring_size: int, *,
                  bandwidth_gbps: float) -> np.ndarray:
        """`seq_time(s, ring_size)` of many plain sequences at once."""
        s = np.asarray(lengths, dtype=np.float64)
        out = (self.a * s * s + self.b * s) / ring_size
        d = ring_size
        if d > 1:
            bw, t = bandwidth_gbps * 1e9, s / d
            kv, dkv = self.kv_bytes_per_token * t / bw, self.dkv_bytes_per_token * t / bw
            block = self.a * t * t / 7
            out += (d - 1) * (np.maximum(0.0, kv - 2 * block)
                              + np.maximum(0.0, kv + dkv - 5 * block)) + dkv
        return out

    def single_rank_times(self, lengths: Sequence[int] | np.ndarray,
                          offload_ratios: Sequence[float] | np.ndarray) -> np.ndarray:
        """`seq_time(s, 1, offload_ratio=r)` for many sequences at once (no ring traffic)."""
        s = np.asarray(lengths, dtype=np.float64)
        out = self.a * s * s + self.b * s
        r = np.asarray(offload_ratios, dtype=np.float64)
        for k in np.flatnonzero(r > 0):  # rare: a single rank needing a memory scheme
            out[k] = self.seq_time(int(s[k]), 1, bandwidth_gbps=1.0, offload_ratio=float(r[k]))
        return out

    def group_time(self, lengths: Sequence[int], ring_size: int, *, bandwidth_gbps: float,
                   offload_ratios: Sequence[float] | None = None,
                   scheme: Scheme | None = None) -> float:
        """A group's per-rank time: c plus every sequence it runs (varlen packing)."""
        ratios = offload_ratios or [0.0] * len(lengths)
        return self.c + sum(self.seq_time(s, ring_size, bandwidth_gbps=bandwidth_gbps,
                                          offload_ratio=r, scheme=scheme)
                            for s, r in zip(lengths, ratios, strict=True))

    def group_seconds_of(self, shards, ring_size: int, bandwidth_gbps: float) -> float:
        """A planned group's time (the simulator's figure): c plus its sequences under the
        group's scheme, MEMO offload at the group's alpha if any of them needs memory freed
        (scheduler.planner.group_scheme)."""
        if not any(sh.offload_ratio > 0 for sh in shards):
            return self.c + sum(self.seq_time(sh.length, ring_size, bandwidth_gbps=bandwidth_gbps)
                                for sh in shards)
        from scheduler.zigzag import max_local_tokens

        lengths = [sh.length for sh in shards]
        alpha = self.memo_alpha(max_local_tokens(lengths, ring_size),
                                round(sum(lengths) / len(lengths)))
        scheme = Scheme(name="offload", offload_ratio=alpha)
        return self.c + sum(self.seq_time(s, ring_size, bandwidth_gbps=bandwidth_gbps,
                                          scheme=scheme) for s in lengths)

    def max_hidden_ring(self, length: int, *, bandwidth_gbps: float) -> int:
        """Largest ring whose KV and dK/dV hand-offs still hide behind the attention block
        (>= 1): kv <= 2 block and kv + dkv <= 5 block, block = a s^2 / (7 d^2)."""
        bw = bandwidth_gbps * 1e9
        unit = self.a * length * bw / 7  # d <= unit * k / bytes
        d = min(2 * unit / self.kv_bytes_per_token,
                5 * unit / (self.kv_bytes_per_token + self.dkv_bytes_per_token))
        return max(1, int(math.floor(d)))

    # -- per step -------------------------------------------------------------------------
    def step_overhead_s(self, world_size: int | None = None) -> float:
        """Collectives and the optimizer update after the last micro-batch (seconds)."""
        mem = self._memory_for(world_size)
        n = mem.world_size
        bw = (self.cluster.inter_node_bandwidth_gbps if n > self.cluster.gpus_per_node
              else self.cluster.intra_node_bandwidth_gbps) * 1e9
        comm = 0.0
        for col in step_collectives(self.model, precision=mem.precision, sharding=mem.sharding,
                                    world_size=n, shard_mirror=mem.shard_mirror):
            factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
                      "all_gather": (n - 1) / n, "broadcast": 1.0 / n,
                      "send_recv": 1.0}[col.op]
            comm += factor * col.payload_bytes / bw
        return comm + self.optimizer_s(mem)

    def optimizer_s(self, mem: RankMemory | None = None) -> float:
        """AdamW over the rank's share of the parameters, memory-bound: per owned element
        read the gradient twice (norm, update), read and write the master and both
        moments, and write the compute parameter when it is a separate copy. A shard mirror
        (docs/elastic.md) runs the same update on its copy: read its shifted gradient once,
        read and write its master (bf16-mixed) and moments, no compute parameter."""
        mem = mem or self.memory
        mb = DTYPE_BYTES[master_dtype(mem.precision)]
        cb = DTYPE_BYTES[mem.dtype]
        owned = mem.states.moments // (2 * mb)
        per_element = 2 * mb + 2 * mb + 4 * mb + (cb if has_masters(mem.precision) else 0)
        mirror = (owned * mb + 2 * mem.states.mirror) if mem.states.mirror else 0
        busy = owned * per_element + mirror
        return busy / (self.cluster.memory_bandwidth_gbps * 1e9)

    # -- refit --------------------------------------------------------------------------
    def update(self, observations: Iterable, *, keep_prior_shape: bool = False) -> CostModel:
        """Refit a, b, c by non-negative least squares on measured group times.

        Each observation is (lengths, seconds), (lengths, ring_size, seconds), a dict with
        those keys or an `Observation`; the model fitted is
        seconds = a sum(s^2)/d + b sum(s)/d + c. Needs three observations whose features
        are not collinear. With `keep_prior_shape` (noisy measurements of groups of similar
        size, as a running job sees them), the FLOP-count figures `prior` scaled by one
        factor are kept unless a fit with a free constant c, or a free fit, explains the
        times clearly better (squared residual below FREE_FIT_MARGIN x): a free fit of
        near-collinear noisy data can put most of the time into c and make tokens
        nearly free.
        Returns self (coefficients are replaced in place).
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
        coef = nonneg_lstsq(X, y)
        if keep_prior_shape:
            coef = _prior_unless_clearly_worse(X, y, coef, np.asarray(self.prior))
        self.a, self.b, self.c = (float(v) for v in coef)
        self._seq_costs.clear()
        self._at_speed.clear()
        return self


FREE_FIT_MARGIN = 0.5  # each extra free coefficient must halve the squared residual


def _prior_unless_clearly_worse(X: np.ndarray, y: np.ndarray, free: np.ndarray,
                                prior: np.ndarray) -> np.ndarray:
    """The simplest of three nested fits that explains the times (see `CostModel.update`):
    the prior scaled by one factor k (k a0, k b0, k c0); its compute shape with a fitted
    constant (k a0, k b0, c); `free`. A fit with more coefficients is taken only where it
    cuts the squared residual below FREE_FIT_MARGIN x the simpler one's: over groups of
    similar size, noise alone lets a free constant absorb most of the time (a shallow
    slope, a large intercept), which would make a slow rank's fixed cost dominate."""
    def err(coef: np.ndarray) -> float:
        return float(np.sum((X @ coef - y) ** 2))

    whole = X @ prior
    scaled = prior * max(0.0, float(whole @ y) / max(float(whole @ whole), 1e-300))
    compute = X[:, :2] @ prior[:2]
    k, c = nonneg_lstsq(np.stack([compute, X[:, 2]], axis=1), y)
    best = scaled
    if k > 0 and err(np.array([k * prior[0], k * prior[1], c])) < FREE_FIT_MARGIN * err(best):
        best = np.array([k * prior[0], k * prior[1], c])
    return free if err(free) < FREE_FIT_MARGIN * err(best) else best


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
    return model.num_layers * layer_matmul_params(model) + model.vocab_size * model.hidden_size
