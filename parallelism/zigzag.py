"""Zigzag sharding of packed variable-length batches over a ring, for any lengths.

Why: causal attention over a sequence cut into d contiguous pieces gives the last piece d
times the work of the first. Cutting it into 2d chunks and giving ring position j chunks j
and 2d-1-j (the zigzag layout of zhuzilin/ring-flash-attention; Llama 3's context
parallelism, arXiv 2407.21783 Sec. 3.3.2, does the same) makes every position's causal
work equal, so every ring step costs the same on every member.

Lengths need not be divisible by 2d (ByteScale shards whatever the planner sends). We use
*uneven chunks*, no padding: a sequence of length L is cut into 2d chunks whose sizes are
`L // 2d`, plus one for the first `L % 2d` chunks. Chunk sizes differ by at most one token,
chunks stay contiguous in global order (so block-level causality is exact: chunk a sees all
of chunk b < a, none of chunk b > a, and itself causally), and nothing has to be masked out
of attention or of the loss. Position j holds `L // d` or `L // d + 1` tokens (+-1 of
perfect balance); chunks may be empty when L < 2d.

Everything here is index arithmetic on Python ints and small index tensors; it is shared
by the worker runtime (to shard tokens, targets and position ids) and by ring attention
(to pick the rows of each ring step). Local layout of a shard: for every sequence in batch
order, its chunk j then its chunk 2d-1-j, so each sequence stays contiguous locally and
`cu_seqlens_local` is an ordinary varlen descriptor.

Legend: T tokens (packed), S sequences, d ring size, j ring position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ZigzagLayout",
    "lengths_from_cu",
    "zigzag_chunk_bounds",
    "zigzag_index",
    "zigzag_shard",
    "zigzag_unshard",
]


def _check_ring(ring_size: int, ring_index: int | None = None) -> None:
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size must be an int >= 1, got {ring_size!r}")
    if ring_index is not None and (
        isinstance(ring_index, bool) or not isinstance(ring_index, int)
        or not 0 <= ring_index < ring_size
    ):
        raise ValueError(
            f"ring_index must be an int in [0, {ring_size - 1}] for ring_size {ring_size}, "
            f"got {ring_index!r}"
        )


def lengths_from_cu(cu_seqlens: torch.Tensor | Sequence[int], name: str) -> tuple[int, ...]:
    """Validate a cu_seqlens descriptor (0, nondecreasing, 1-D) and return its lengths."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape "
                             f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
        cu = [int(c) for c in cu_seqlens.tolist()]
    else:
        cu = [int(c) for c in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"{name} must start at 0, be nondecreasing and describe at least one "
                         f"sequence, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    return tuple(b - a for a, b in zip(cu, cu[1:], strict=False))


def zigzag_chunk_bounds(length: int, ring_size: int) -> list[int]:
    """The 2d+1 boundaries of a length-`length` sequence cut into 2*ring_size chunks.

    Chunk c is [bounds[c], bounds[c+1]); its size is length // 2d plus one if c < length % 2d.
    """
    _check_ring(ring_size)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    num_chunks = 2 * ring_size
    base, rem = divmod(length, num_chunks)
    return [c * base + min(c, rem) for c in range(num_chunks + 1)]


@dataclass(frozen=True, kw_only=True)
class ZigzagLayout:
    """Where every token of a packed batch lives on a ring of `ring_size` positions."""

    lengths: tuple[int, ...]
    """Global length of every sequence of the packed batch, in batch order."""
    ring_size: int
    """Number of ring positions d; each sequence is cut into 2d chunks."""

    def __post_init__(self) -> None:
        _check_ring(self.ring_size)
        if not self.lengths or any(n < 0 for n in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of ints >= 0, got "
                             f"{list(self.lengths)[:8]}")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor | Sequence[int], ring_size: int
                        ) -> ZigzagLayout:
        return cls(lengths=lengths_from_cu(cu_seqlens, "cu_seqlens"), ring_size=ring_size)

    @classmethod
    def from_local_lengths(cls, local_lengths: Sequence[Sequence[int]]) -> ZigzagLayout:
        """Rebuild the layout from every position's per-sequence local lengths (ring order).

        Raises ValueError if they are not the zigzag shards of one batch.
        """
        ring_size = len(local_lengths)
        lengths = tuple(sum(col) for col in zip(*local_lengths, strict=True))
        layout = cls(lengths=lengths, ring_size=ring_size)
        for j, got in enumerate(local_lengths):
            want = layout.local_lengths(j)
            if tuple(got) != want:
                raise ValueError(
                    f"ring position {j} holds per-sequence lengths {list(got)[:8]} but a zigzag "
                    f"shard of global lengths {list(lengths)[:8]} over {ring_size} positions "
                    f"holds {list(want)[:8]}: every member must pass the cu_seqlens_local that "
                    f"zigzag_shard returned for its own position"
                )
        return layout

    def chunk_sizes(self, ring_index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence sizes of (chunk j, chunk 2d-1-j) held by position j."""
        _check_ring(self.ring_size, ring_index)
        first, second = [], []
        for length in self.lengths:
            b = zigzag_chunk_bounds(length, self.ring_size)
            mirror = 2 * self.ring_size - 1 - ring_index
            first.append(b[ring_index + 1] - b[ring_index])
            second.append(b[mirror + 1] - b[mirror])
        return tuple(first), tuple(second)

    def local_lengths(self, ring_index: int) -> tuple[int, ...]:
        first, second = self.chunk_sizes(ring_index)
        return tuple(a + b for a, b in zip(first, second, strict=True))

    def local_cu_seqlens(self, ring_index: int, *, part: str = "both") -> torch.Tensor:
        """int32 cu_seqlens of position j's shard, or of only its first/second chunks."""
        first, second = self.chunk_sizes(ring_index)
        sizes = {"both": self.local_lengths(ring_index), "first": first, "second": second}
        if part not in sizes:
            raise ValueError(f"part must be one of {sorted(sizes)}, got {part!r}")
        cu = torch.zeros(len(self.lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(sizes[part], dtype=torch.int64), 0)
        return cu

    def local_rows(self, ring_index: int, part: str) -> torch.Tensor:
        """Row indices, inside position j's shard, of its first or second chunks (int64)."""
        if part not in ("first", "second"):
            raise ValueError(f"part must be 'first' or 'second', got {part!r}")
        first, second = self.chunk_sizes(ring_index)
        pieces, offset = [], 0
        for a, b in zip(first, second, strict=True):
            start = offset if part == "first" else offset + a
            pieces.append(torch.arange(start, start + (a if part == "first" else b)))
            offset += a + b
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

    def global_index(self, ring_index: int) -> torch.Tensor:
        """Packed global row of every token of position j's shard, in local order (int64)."""
        _check_ring(self.ring_size, ring_index)
        mirror = 2 * self.ring_size - 1 - ring_index
        pieces, seq_start = [], 0
        for length in self.lengths:
            b = zigzag_chunk_bounds(length, self.ring_size)
            pieces.append(torch.arange(seq_start + b[ring_index], seq_start + b[ring_index + 1]))
            pieces.append(torch.arange(seq_start + b[mirror], seq_start + b[mirror + 1]))
            seq_start += length
        return torch.cat(pieces)

    def position_ids(self, ring_index: int) -> torch.Tensor:
        """Global position (inside its own sequence) of every token of position j's shard."""
        mirror = 2 * self.ring_size - 1 - ring_index
        pieces = []
        for length in self.lengths:
            b = zigzag_chunk_bounds(length, self.ring_size)
            pieces.append(torch.arange(b[ring_index], b[ring_index + 1]))
            pieces.append(torch.arange(b[mirror], b[mirror + 1]))
        return torch.cat(pieces)


def zigzag_index(cu_seqlens: torch.Tensor | Sequence[int], ring_size: int, ring_index: int
                 ) -> torch.Tensor:
    """Global packed row of every token ring position `ring_index` holds, in local order."""
    return ZigzagLayout.from_cu_seqlens(cu_seqlens, ring_size).global_index(ring_index)


def zigzag_shard(
    x: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int], ring_size: int, ring_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of packed `x` ([T, ...]) that ring position `ring_index` holds.

    Returns (x_local, cu_seqlens_local int32, position_ids_local int64), where position ids
    are global positions inside each sequence (for RoPE). Works for tokens, targets,
    hidden states: any tensor whose dim 0 is the packed token dim. Tensors stay on x's device.
    """
    layout = ZigzagLayout.from_cu_seqlens(cu_seqlens, ring_size)
    _check_ring(ring_size, ring_index)
    total = sum(layout.lengths)
    if x.dim() < 1 or x.shape[0] != total:
        raise ValueError(f"x must have the packed token dim first with {total} rows "
                         f"(cu_seqlens[-1]), got shape {tuple(x.shape)}")
    index = layout.global_index(ring_index).to(x.device)
    return (
        x.index_select(0, index),
        layout.local_cu_seqlens(ring_index).to(x.device),
        layout.position_ids(ring_index).to(x.device),
    )


def zigzag_unshard(
    x_shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Inverse of zigzag_shard: reassemble the packed batch from every position's shard.

    `x_shards[j]` is position j's x_local (ring order); the ring size is len(x_shards).
    """
    if not x_shards:
        raise ValueError("x_shards must hold one shard per ring position, got none")
    layout = ZigzagLayout.from_cu_seqlens(cu_seqlens, len(x_shards))
    for j, shard in enumerate(x_shards):
        want = sum(layout.local_lengths(j))
        if shard.dim() < 1 or shard.shape[0] != want:
            raise ValueError(f"x_shards[{j}] must have {want} rows for ring position {j} of "
                             f"{len(x_shards)}, got shape {tuple(shard.shape)}")
    ref = x_shards[0]
    out = ref.new_empty((sum(layout.lengths), *ref.shape[1:]))
    for j, shard in enumerate(x_shards):
        out.index_copy_(0, layout.global_index(j).to(ref.device), shard)
    return out
