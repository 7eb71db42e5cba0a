"""Zigzag ring attention over a dynamic ring of global ranks (exact, varlen, GQA, causal).

Why: a sequence too long for one rank is split over a ring (ByteScale's context-parallel
groups, arXiv 2502.21231 Sec. 4); each member keeps its query shard and sees every other
member's keys/values as they travel around the ring (Li et al. 2105.13120; Liu et al.
2310.01889). Each ring step is one call of kernels.attention_with_lse; partial results merge
exactly with their log-sum-exps (kernels.merge_attention: lse = log(e^lse_a + e^lse_b),
O = e^(lse_a-lse) O_a + e^(lse_b-lse) O_b), in float32 (float64 for float64 inputs).

Zigzag (parallelism/zigzag.py): position i holds chunks i and 2d-1-i of every sequence, so
with r the owner of the block seen at step s (r = i - s mod d), causal attention needs
    r == i: the local shard against itself, causal (lq == lk, aligned);
    r <  i: all local queries against r's first chunks (all visible), no mask;
    r >  i: the local second chunks against all of r's keys (all visible), no mask;
so every member does the same work (half a block) at every step after the first. Chunks may
be uneven or empty (any lengths); sequences with no query or no key rows in a step are
simply left out of that step's kernel call.

Forward: KV blocks travel to the next member with batch_isend_irecv, the next block in
flight while the current one is computed. Backward (FlashAttention-2 Alg. 2 per block, from
the merged out/lse): the KV blocks travel again; dq accumulates locally; each block's dk/dv
accumulator travels with it, one step behind, and after d hops arrives back at its owner.

Before the forward, members exchange a fixed header (ring digest, position, shapes, dtype,
causal, scale) and then their per-sequence local lengths with every other member (two small
rounds). Mismatched rings, shapes or shards fail there with a clear error instead of
deadlocking or silently mixing data; the lengths also give every member every block's size,
since uneven chunks make shards differ by a token. The backward reuses that layout.

Concurrency: point-to-point ops on one process group (no group per ring); disjoint rings
run at the same time. Every member must call forward (and backward) of the same ring op in
the same order. With NCCL, the first operation on the group must be a collective of all
ranks (e.g. the start-up barrier) before any ring's batch_isend_irecv (a torch rule for
batched p2p on a subset of ranks). Memory: two KV blocks (current and in flight) plus, in
backward, two dk/dv accumulators in the accumulation dtype.

Legend: T tokens (packed, local), Hq/Hkv query/kv heads, D head dim, d ring size,
i this rank's ring position, r the owner of a KV block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels import (
    accumulation_dtype,
    attention_with_lse,
    attention_with_lse_backward,
    check_qkv,
    merge_attention,
)
from parallelism.comm import (
    CommStats,
    RingComm,
    RingCommError,
    check_ring,
    current_rank_and_world,
)
from parallelism.progress import PROGRESS
from parallelism.zigzag import ZigzagLayout, lengths_from_cu

__all__ = [
    "RingBlock",
    "RingSetup",
    "ring_attention",
    "ring_attention_backward",
    "ring_attention_forward",
    "ring_attention_setup",
    "ring_block",
    "select_rows",
]

_MAGIC = 0x52494E47  # "RING": a header from something else is caught, not misread
_HEADER_FIELDS = ("magic", "ring digest", "ring size", "position", "num sequences",
                  "q heads", "kv heads", "head dim", "causal", "dtype", "softmax scale")
_TAG_HANDSHAKE, _TAG_KV, _TAG_BWD_KV, _TAG_BWD_DKV = 7, 1, 2, 3


@dataclass(frozen=True, kw_only=True)
class RingBlock:
    """One ring step's kernel call: which local rows, which rows of the KV block, how."""

    q_rows: torch.Tensor | None
    """Local query rows used (int64), or None for all of them in order."""
    kv_rows: torch.Tensor | None
    """Rows of the received KV block used, or None for all."""
    cu_q: torch.Tensor
    """int32 cu_seqlens of the selected query rows (sequences with no rows left out)."""
    cu_k: torch.Tensor
    """int32 cu_seqlens of the selected key rows, same sequences."""
    causal: bool
    """Whether the kernel applies the (aligned) causal mask: the diagonal step only."""


def _segments(layout: ZigzagLayout, j: int, part: str) -> list[tuple[int, int]]:
    """(start row, length) per sequence of position j's first/second chunks or whole shard."""
    first, second = layout.chunk_sizes(j)
    segs, offset = [], 0
    for a, b in zip(first, second, strict=True):
        segs.append({"both": (offset, a + b), "first": (offset, a),
                     "second": (offset + a, b)}[part])
        offset += a + b
    return segs


def _rows_and_cu(segs: list[tuple[int, int]], total: int, device: torch.device
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    rows = torch.cat([torch.arange(s, s + n) for s, n in segs])
    cu = torch.zeros(len(segs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([n for _, n in segs]), 0)
    return (None if len(rows) == total else rows.to(device)), cu.to(device)


def ring_block(layout: ZigzagLayout, position: int, owner: int, causal: bool,
               device: torch.device) -> RingBlock | None:
    """The kernel call of ring position `position` against the KV block of ring position
    `owner` (None: no key of it is visible)."""
    i, r = position, owner
    if not causal or r == i:
        q_part, k_part = "both", "both"
    else:
        q_part, k_part = ("both", "first") if r < i else ("second", "both")
    q_segs, k_segs = _segments(layout, i, q_part), _segments(layout, r, k_part)
    keep = [s for s in range(len(q_segs)) if q_segs[s][1] > 0 and k_segs[s][1] > 0]
    if not keep:
        return None
    q_rows, cu_q = _rows_and_cu([q_segs[s] for s in keep], sum(layout.local_lengths(i)), device)
    kv_rows, cu_k = _rows_and_cu([k_segs[s] for s in keep], sum(layout.local_lengths(r)), device)
    return RingBlock(q_rows=q_rows, kv_rows=kv_rows, cu_q=cu_q, cu_k=cu_k,
                     causal=causal and r == i)


def select_rows(x: torch.Tensor, rows: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """The rows of `x` along `dim` a `RingBlock` uses (`x` itself when `rows` is None)."""
    return x if rows is None else x.index_select(dim, rows)


# ---------------------------------------------------------------- handshake


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _header(ring: tuple[int, ...], position: int, q: torch.Tensor, k: torch.Tensor,
            num_seqs: int, causal: bool, scale: float) -> torch.Tensor:
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    fields = [_MAGIC, _digest(repr(ring)), len(ring), position, num_seqs, q.shape[1],
              k.shape[1], q.shape[2], int(causal), _digest(str(q.dtype)), scale_bits]
    return torch.tensor(fields, dtype=torch.int64, device=q.device)


def _gather_members(comm: RingComm, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every member's `tensor` (same shape everywhere), in ring order, in one round."""
    got = []
    for peer in comm.ring:
        if peer == comm.rank:
            got.append(tensor)
        else:
            got.append(comm.recv(torch.empty_like(tensor), src=peer))
            comm.send(tensor, to=peer)
    comm.commit()
    comm.wait()
    return got


def _check_headers(comm: RingComm, headers: list[torch.Tensor]) -> None:
    mine = headers[comm.position].tolist()
    for m, peer in enumerate(comm.ring):
        theirs = headers[m].tolist()
        expected = list(mine)
        expected[3] = m  # the peer's own position in the ring as this rank sees it
        diff = [f"{name}: {t} (this rank expects {e})"
                for name, t, e in zip(_HEADER_FIELDS, theirs, expected, strict=True) if t != e]
        if diff:
            raise RingCommError(
                f"rank {comm.rank} (position {comm.position} of ring {list(comm.ring)}) and "
                f"rank {peer} disagree on the ring attention call: " + "; ".join(diff)
                + ". All members must call with the same ring (same order), heads, head dim, "
                "dtype, causal and softmax_scale, the same number of times."
            )


def _agree_layout(comm: RingComm, q: torch.Tensor, k: torch.Tensor, local_lengths: tuple,
                  causal: bool, scale: float) -> ZigzagLayout:
    header = _header(comm.ring, comm.position, q, k, len(local_lengths), causal, scale)
    _check_headers(comm, _gather_members(comm, header))
    lengths = torch.tensor(local_lengths, dtype=torch.int64, device=q.device)
    everyone = _gather_members(comm, lengths)
    return ZigzagLayout.from_local_lengths([t.tolist() for t in everyone])


# ---------------------------------------------------------------- forward / backward


def _owner(position: int, step: int, size: int) -> int:
    return (position - step) % size


def _ring_forward(q, k, v, *, blocks, block_tokens, comm, scale, backend):
    """Returns (out [T, Hq, D] in q.dtype, lse [Hq, T] in the accumulation dtype)."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    size = len(blocks)
    for step in range(size):
        PROGRESS.hop(step)
        if step + 1 < size:
            nxt = comm.send_recv(kv, kv.new_empty((2, block_tokens[step + 1], *k.shape[1:])))
            comm.commit()
        block = blocks[step]
        if block is not None:
            out_b, lse_b = attention_with_lse(
                select_rows(q, block.q_rows), select_rows(kv[0], block.kv_rows),
                select_rows(kv[1], block.kv_rows), cu_seqlens_q=block.cu_q, cu_seqlens_k=block.cu_k,
                causal=block.causal, softmax_scale=scale, backend=backend)
            merged, merged_lse = merge_attention(select_rows(out, block.q_rows), select_rows(
                lse, block.q_rows, 1), out_b, lse_b)
            _put(out, block.q_rows, merged)
            _put(lse, block.q_rows, merged_lse, dim=1)
        if step + 1 < size:
            comm.wait()
            kv = nxt
    return out.to(q.dtype), lse


def _put(dst: torch.Tensor, rows: torch.Tensor | None, src: torch.Tensor, dim: int = 0) -> None:
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(dim, rows, src.to(dst.dtype))


def _ring_backward(dout, q, k, v, out, lse, *, blocks, block_tokens, kv_comm, dkv_comm, scale,
                   backend):
    """Returns (dq, dk, dv) in the dtypes of q, k, v."""
    acc = lse.dtype
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    size = len(blocks)
    dkv_in: torch.Tensor | None = None
    for step in range(size):
        PROGRESS.hop(step)
        if step + 1 < size:
            nxt = kv_comm.send_recv(kv, kv.new_empty((2, block_tokens[step + 1], *k.shape[1:])))
            kv_comm.commit()
        dkv = torch.zeros((2, block_tokens[step], *k.shape[1:]), dtype=acc, device=k.device)
        block = blocks[step]
        if block is not None:
            rows = block.q_rows
            dq_b, dk_b, dv_b = attention_with_lse_backward(
                select_rows(dout, rows), select_rows(q, rows),
                select_rows(kv[0], block.kv_rows), select_rows(kv[1], block.kv_rows),
                select_rows(out, rows), select_rows(lse, rows, 1),
                cu_seqlens_q=block.cu_q, cu_seqlens_k=block.cu_k, causal=block.causal,
                softmax_scale=scale, backend=backend)
            _add(dq, rows, dq_b)
            _add(dkv[0], block.kv_rows, dk_b)
            _add(dkv[1], block.kv_rows, dv_b)
        if dkv_in is not None:
            dkv_comm.wait()  # the accumulator of this same block, from the previous member
            dkv += dkv_in
        if size > 1:
            # After d hops the accumulator that arrives is this rank's own block's.
            dkv_in = dkv_comm.send_recv(dkv, dkv.new_empty(
                (2, block_tokens[(step + 1) % size], *k.shape[1:])))
            dkv_comm.commit()
        if step + 1 < size:
            kv_comm.wait()
            kv = nxt
    if size > 1:
        dkv_comm.wait()
        assert dkv_in is not None, "every hop of a ring of size > 1 sends dkv on"
        dkv = dkv_in
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _add(dst: torch.Tensor, rows: torch.Tensor | None, src: torch.Tensor) -> None:
    if rows is None:
        dst.add_(src.to(dst.dtype))
    else:
        dst.index_add_(0, rows, src.to(dst.dtype))


# ---------------------------------------------------------------- autograd + public API


@dataclass(frozen=True, kw_only=True)
class RingSetup:
    """Everything a ring attention call needs besides q/k/v, agreed by all members.

    Built by ring_attention_setup (one handshake); reusable for every call with the same
    ring, shard layout, heads, dtype, causal and scale (e.g. every layer of a step).
    """

    ring: tuple[int, ...]
    """Global ranks in ring order."""
    position: int
    """This rank's index in `ring`."""
    blocks: tuple[RingBlock | None, ...]
    """Kernel call of each ring step (None: no visible key)."""
    block_tokens: tuple[int, ...]
    """Rows of the KV block held at each step (its owner's local token count)."""
    scale: float
    """Softmax scale."""
    backend: str
    """kernels backend."""
    group: dist.ProcessGroup | None
    """Process group carrying the point-to-point ops (None: the default group)."""
    stats: CommStats | None
    """Where bytes moved are counted (None: not counted)."""


def _setup(q, k, cu_seqlens, ring, causal, scale, backend, group, stats) -> RingSetup:
    local_lengths = lengths_from_cu(cu_seqlens, "cu_seqlens")
    if sum(local_lengths) != q.shape[0]:
        raise ValueError(f"cu_seqlens[-1] must equal the local token count q.shape[0]="
                         f"{q.shape[0]}, got {sum(local_lengths)}")
    if len(ring) == 1:
        members, position = check_ring(ring, *current_rank_and_world()), 0
        layout = ZigzagLayout(lengths=local_lengths, ring_size=1)
    else:
        comm = RingComm(ring, channel="handshake", group=group, tag=_TAG_HANDSHAKE, stats=stats)
        members, position = comm.ring, comm.position
        layout = _agree_layout(comm, q, k, local_lengths, causal, scale)
    size = len(members)
    owners = [_owner(position, s, size) for s in range(size)]
    return RingSetup(
        ring=members, position=position,
        blocks=tuple(ring_block(layout, position, r, causal, q.device) for r in owners),
        block_tokens=tuple(sum(layout.local_lengths(r)) for r in owners),
        scale=scale, backend=backend, group=group, stats=stats)


def _comm(setup: RingSetup, channel: str, tag: int) -> RingComm:
    return RingComm(setup.ring, channel=channel, group=setup.group, tag=tag, stats=setup.stats)


def ring_attention_setup(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    ring: Sequence[int],
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    comm_stats: CommStats | None = None,
    backend: str = "auto",
) -> RingSetup:
    """Agree on the ring's layout with every member (collective over the ring).

    Same arguments as ring_attention; q and k only lend their shapes, dtype and device.
    """
    _check_qkv(q, k, k)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale!r}")
    return _setup(q, k, cu_seqlens, ring, causal, scale, backend, group, comm_stats)


@torch.no_grad()
def ring_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           setup: RingSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward without autograd: (out [T, Hq, D] in q's dtype, lse [Hq, T] float32/64)."""
    comm = _comm(setup, "kv", _TAG_KV) if len(setup.ring) > 1 else None
    return _ring_forward(q.contiguous(), k.contiguous(), v.contiguous(), blocks=setup.blocks,
                         block_tokens=setup.block_tokens, comm=comm, scale=setup.scale,
                         backend=setup.backend)


@torch.no_grad()
def ring_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, setup: RingSetup,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's shard from the forward's out and lse (collective)."""
    multi = len(setup.ring) > 1
    return _ring_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
        blocks=setup.blocks, block_tokens=setup.block_tokens,
        kv_comm=_comm(setup, "bwd_kv", _TAG_BWD_KV) if multi else None,
        dkv_comm=_comm(setup, "bwd_dkv", _TAG_BWD_DKV) if multi else None,
        scale=setup.scale, backend=setup.backend)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: RingSetup):
        out, lse = ring_attention_forward(q, k, v, setup)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = setup
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ring_attention_backward(dout, q, k, v, out, lse, ctx.setup), None)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernels' q/k/v rules, plus: a zigzag shard holds as many k/v tokens as q tokens."""
    check_qkv(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must hold q's T_local={q.shape[0]} tokens (one zigzag "
                         f"shard), got q {tuple(q.shape)}, k {tuple(k.shape)}")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    ring: Sequence[int],
    causal: bool = True,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    comm_stats: CommStats | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of this rank's zigzag shard over the whole of every sequence; differentiable.

    q [T_local, Hq, D], k/v [T_local, Hkv, D] and `cu_seqlens` are what zigzag_shard gave
    this rank's ring position (q/k/v after RoPE with its position ids). `ring` lists the
    ring's global ranks in ring order; this rank's position is its index there. A ring of
    one rank is plain local attention (no communication). `group` carries the
    point-to-point ops (default: the global group); `comm_stats` counts bytes per channel
    ('handshake', 'kv'; backward: 'bwd_kv', 'bwd_dkv'). Returns out [T_local, Hq, D].
    Each call runs the handshake; to reuse one across layers, use ring_attention_setup with
    ring_attention_forward / ring_attention_backward.
    """
    _check_qkv(q, k, v)
    setup = ring_attention_setup(q, k, cu_seqlens=cu_seqlens, ring=ring, causal=causal,
                                 softmax_scale=softmax_scale, group=group,
                                 comm_stats=comm_stats, backend=backend)
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), setup)
