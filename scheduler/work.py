"""What one rank of a group really does: matmul FLOPs and ring bytes, exactly.

The cost model (scheduler/cost.py) turns these into time; the fidelity tests hold them
equal to `torch.utils.flop_counter.FlopCounterMode` (within 2%) and to RingComm's byte
counters (exactly). So every figure here follows the executor's code, not a textbook:

FLOPs (matmuls only, as FlopCounterMode counts them; norms, RoPE and softmax are not):

    dense      per token: forward 2 P_layer per layer, backward 4 P_layer (dX and dW of
               every projection), LM head 6 h V (logits, dh, dW: kernels.linear_ce)
    attention  the torch kernel's tiles (kernels/attention_torch.py): per block of
               ATTENTION_BLOCK_Q queries, every key up to the block's last visible one;
               forward 4 Hq D per (query, key) pair (QK^T, PV), backward 10 (it recomputes
               P: QK^T, dV, dP, dQ, dK)
    ring       the same kernel per ring step on the zigzag blocks (scheduler/zigzag.py)
    offload    MEMO (parallelism/offload.py): every layer but the last recomputes, in its
               backward, the token-local forward of the tokens it did not swap:
               + 2 P_layer (T - ceil(alpha T)) per swapped layer
    streambp   layer-wise StreamBP (parallelism/streambp.py): the backward recomputes each
               layer's forward (K/V once, queries and post per chunk): + 2 P_layer T per
               layer; attention runs forward once over the whole sequence (no grad) and
               then forward + backward per query chunk against its key range
    objective  pretrain, sft and grpo run the head once (forward, dh, dW: 6 h V per
               token); dpo first computes every sequence's log-prob without a graph
               (workers/objectives.py, StreamBP Sec. 3.3): + 2 h V per token

Ring bytes a rank sends per micro-batch (parallelism/ring_attention.py, per layer):
forward d-1 KV blocks and backward d-1 KV blocks in the compute dtype, and d hops of the
dK/dV accumulators in the accumulation dtype (float32; float64 for float64), plus one
handshake per micro-batch (an 11-field int64 header and the per-sequence local lengths to
each other member). A dpo ring adds its members' partial sequence log-probs once per
micro-batch (parallelism.ring_sum, channel "dpo"): d - 1 float64 vectors of the group's
sequences.

Legend: T tokens a rank holds, P_layer matmul weights of one layer, h hidden, V vocab,
Hq/Hkv query/kv heads, D head dim, d ring size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.errors import SpecError
from scheduler.specs import DTYPE_BYTES, ModelSpec
from scheduler.zigzag import (
    BlockCall,
    all_local_tokens,
    block_tokens,
    chunk_sizes,
    local_lengths,
    ring_step_calls,
    stream_chunk_calls,
)

ATTENTION_BLOCK_Q = 256  # query rows per tile of kernels/attention_torch.py (BLOCK_Q)
HANDSHAKE_HEADER_BYTES = 11 * 8  # parallelism.ring_attention._HEADER_FIELDS, int64
NUM_RESIDENT_LAYERS = 1  # TokenwiseOffloadStack keeps the last layer on the device
SCHEMES = ("plain", "streambp", "offload")
OBJECTIVES = ("pretrain", "sft", "dpo", "grpo")  # workers.loss.OBJECTIVE_TYPES


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise SpecError(f"objective={objective!r} is not valid; valid: {', '.join(OBJECTIVES)}")
    return objective


def head_flops_per_token(model: ModelSpec, objective: str = "pretrain") -> int:
    """Matmul FLOPs of the loss head per token held: 6 h V, + 2 h V for dpo's no-grad pass."""
    passes = 8 if check_objective(objective) == "dpo" else 6
    return passes * model.hidden_size * model.vocab_size


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """A group's memory scheme as the executor runs it (see scheduler/plan.py GroupMemory)."""

    name: str = "plain"  # plain | streambp | offload
    offload_ratio: float = 0.0  # offload: MEMO alpha; streambp: share of kept inputs on host
    chunk_tokens: int | None = None  # streambp: query chunk (and head chunk) in tokens

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"memory scheme={self.name!r} is not valid; valid: "
                             f"{', '.join(SCHEMES)}")
        if self.name == "streambp" and not (isinstance(self.chunk_tokens, int)
                                            and self.chunk_tokens >= 1):
            raise ValueError(f"streambp needs chunk_tokens >= 1, got {self.chunk_tokens!r}")

    @property
    def stream_chunk(self) -> int:
        """chunk_tokens of a streambp scheme (which __post_init__ requires of one)."""
        if self.chunk_tokens is None:
            raise ValueError(f"memory scheme {self.name!r} has no chunk_tokens")
        return self.chunk_tokens


PLAIN = Scheme()


def layer_matmul_params(model: ModelSpec) -> int:
    """Weights of one decoder layer's projections (q, k, v, o, gate, up, down); biases and
    per-head q/k norms are elementwise (no matmul FLOPs)."""
    h = model.hidden_size
    return 2 * h * model.q_dim + 2 * h * model.kv_dim + 3 * h * model.ffn_hidden_size


def accumulation_bytes(dtype: str) -> int:
    """Bytes of the attention accumulators (kernels.varlen.accumulation_dtype)."""
    return 8 if dtype == "float64" else 4


def attention_pairs(call: BlockCall, block_q: int = ATTENTION_BLOCK_Q) -> int:
    """(query, key) pairs the tiled kernel computes for one sequence's call."""
    lq, lk = call.q_len, call.k_len
    if not call.causal:
        return lq * lk
    diag, total = lk - lq, 0
    for i0 in range(0, lq, block_q):
        i1 = min(lq, i0 + block_q)
        total += (i1 - i0) * max(0, min(lk, i1 + diag))
    return total


def _calls(lengths: Sequence[int], ring_size: int, position: int) -> list[BlockCall]:
    if ring_size == 1:
        return [BlockCall(q_len=n, k_len=n, causal=True) for n in lengths if n > 0]
    return [c for s in range(ring_size) for c in ring_step_calls(lengths, ring_size, position, s)]


def _chunks_before(length: int, ring_size: int, chunk: int) -> int:
    """Tokens in zigzag chunks 0..chunk-1 of a sequence."""
    base, rem = divmod(length, 2 * ring_size)
    return chunk * base + min(chunk, rem)


def ring_pairs(lengths: Sequence[int], ring_size: int, position: int) -> int:
    """(query, key) pairs position i computes over all ring steps: the causal diagonal
    step tile by tile, plus, unmasked, all of its queries against the first chunks of
    every earlier position and its second chunks against every key of the later ones
    (the same sum as `_calls`, in O(d) per sequence)."""
    d, i, total = ring_size, position, 0
    for n in lengths:
        qa, qb = chunk_sizes(n, d, i)
        if qa + qb:
            total += attention_pairs(BlockCall(q_len=qa + qb, k_len=qa + qb, causal=True))
        before = _chunks_before(n, d, i)  # first chunks of the earlier positions
        after = _chunks_before(n, d, 2 * d - 1 - i) - _chunks_before(n, d, i + 1)  # later
        total += (qa + qb) * before + qb * after
    return total


@dataclass(frozen=True, kw_only=True)
class GroupFlops:
    """Matmul FLOPs one rank runs for its part of a group, by cause."""

    dense: int  # projections forward + backward and the LM head
    attention: int  # attention kernels, forward + backward (recompute included)
    recompute: int  # extra dense forward of the memory scheme (offload, StreamBP)

    @property
    def total(self) -> int:
        return self.dense + self.attention + self.recompute


def group_flops(model: ModelSpec, lengths: Sequence[int], *, ring_size: int = 1,
                position: int = 0, scheme: Scheme = PLAIN,
                objective: str = "pretrain") -> GroupFlops:
    """Exact matmul FLOPs of ring position `position` running whole `lengths` as a group
    under `objective` (its loss head, see the module doc)."""
    L, hq_d = model.num_layers, model.num_heads * model.head_dim
    local = local_lengths(lengths, ring_size, position) if ring_size > 1 else list(lengths)
    T = sum(local)
    p = layer_matmul_params(model)
    dense = 6 * p * T * L + head_flops_per_token(model, objective) * T
    pairs = ring_pairs(lengths, ring_size, position) if ring_size > 1 else \
        sum(attention_pairs(c) for c in _calls(lengths, 1, 0))
    attention = 14 * hq_d * pairs * L
    recompute = 0
    if scheme.name == "offload":
        swapped = max(0, L - NUM_RESIDENT_LAYERS)
        kept = T - min(T, math.ceil(scheme.offload_ratio * T - 1e-9))
        recompute = 2 * p * kept * swapped
    elif scheme.name == "streambp":
        recompute = 2 * p * T * L
        chunked = sum(attention_pairs(c) for calls in stream_chunk_calls(local, scheme.stream_chunk)
                      for c in calls)
        attention = (4 * pairs + 14 * chunked) * hq_d * L
    return GroupFlops(dense=dense, attention=attention, recompute=recompute)


@dataclass(frozen=True, kw_only=True)
class RingBytes:
    """Bytes one ring position sends in one micro-batch, per RingComm channel."""

    kv: int  # forward KV blocks
    bwd_kv: int  # backward KV blocks
    bwd_dkv: int  # backward dK/dV accumulators
    handshake: int  # layout agreement, once per micro-batch
    dpo: int = 0  # objective dpo: the members' partial sequence log-probs (ring_sum)

    @property
    def total(self) -> int:
        return self.kv + self.bwd_kv + self.bwd_dkv + self.handshake + self.dpo

    def by_channel(self) -> dict[str, int]:
        out = {"kv": self.kv, "bwd_kv": self.bwd_kv, "bwd_dkv": self.bwd_dkv,
               "handshake": self.handshake}
        return out | ({"dpo": self.dpo} if self.dpo else {})


def dpo_bytes(num_sequences: int, ring_size: int, objective: str = "pretrain") -> int:
    """What each ring member sends to add up a dpo group's sequence log-probs: d - 1
    hops of one float64 per sequence (parallelism.ring_sum); 0 for other objectives."""
    if check_objective(objective) != "dpo" or ring_size == 1:
        return 0
    return (ring_size - 1) * 8 * num_sequences


def ring_bytes(model: ModelSpec, lengths: Sequence[int], *, ring_size: int, position: int,
               dtype: str, num_layers: int | None = None,
               objective: str = "pretrain") -> RingBytes:
    """What ring position `position` sends for `lengths` on a ring of `ring_size` ranks,
    in compute dtype `dtype`, over `num_layers` layers (default: the model's), under
    `objective`."""
    d = ring_size
    if d == 1:
        return RingBytes(kv=0, bwd_kv=0, bwd_dkv=0, handshake=0)
    L = model.num_layers if num_layers is None else num_layers
    row = 2 * model.num_kv_heads * model.head_dim  # K and V values per token
    blocks = block_tokens(lengths, d, position)
    kv = sum(blocks[:-1]) * row * DTYPE_BYTES[dtype]
    dkv = sum(blocks) * row * accumulation_bytes(dtype)
    handshake = (d - 1) * (HANDSHAKE_HEADER_BYTES + 8 * len(lengths))
    return RingBytes(kv=L * kv, bwd_kv=L * kv, bwd_dkv=L * dkv, handshake=handshake,
                     dpo=dpo_bytes(len(lengths), d, objective))


def ring_bytes_per_position(model: ModelSpec, lengths: Sequence[int], *, ring_size: int,
                            dtype: str, objective: str = "pretrain") -> list[RingBytes]:
    """`ring_bytes` of every ring position at once (O(d) instead of O(d^2)): a position
    sends every block but the one it receives last, its successor's."""
    d = ring_size
    if d == 1:
        return [ring_bytes(model, lengths, ring_size=1, position=0, dtype=dtype)]
    dpo = dpo_bytes(len(lengths), d, objective)
    L, row = model.num_layers, 2 * model.num_kv_heads * model.head_dim
    held = all_local_tokens(lengths, d)
    total = sum(held)
    handshake = (d - 1) * (HANDSHAKE_HEADER_BYTES + 8 * len(lengths))
    out = []
    for i in range(d):
        kv = L * (total - held[(i + 1) % d]) * row * DTYPE_BYTES[dtype]
        out.append(RingBytes(kv=kv, bwd_kv=kv, bwd_dkv=L * total * row * accumulation_bytes(dtype),
                             handshake=handshake, dpo=dpo))
    return out


def max_ring_bytes(model: ModelSpec, lengths: Sequence[int], *, ring_size: int,
                   dtype: str) -> int:
    """Bytes sent by the ring member that sends the most."""
    return max(ring_bytes(model, lengths, ring_size=ring_size, position=j, dtype=dtype).total
               for j in range(ring_size))
