"""Zigzag ring layout as integer arithmetic: what every ring position holds and computes.

The workers shard sequences with parallelism/zigzag.py and run ring attention with
parallelism/ring_attention.py; both need torch, which the planner may not import. The
cost and memory models still have to know, exactly, how many tokens each ring position
holds (uneven chunks: a length-L sequence is cut into 2d chunks of L // 2d tokens, plus one
for the first L % 2d), which keys each ring step's kernel call sees, and how large each
block that travels is. This module is that arithmetic once more, on Python ints;
tests/scheduler/test_zigzag.py holds it equal to the torch side for odd lengths and rings.

Ring step s at position i sees the block of owner r = (i - s) mod d:
    r == i: the local shard against itself, causal;
    r <  i: every local query against r's first chunks, no mask;
    r >  i: the local second chunks against every key of r, no mask.

Legend: d ring size, i ring position, r block owner, L a sequence's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def chunk_bounds(length: int, ring_size: int) -> list[int]:
    """The 2d + 1 boundaries of a sequence cut into 2d zigzag chunks."""
    n = 2 * ring_size
    base, rem = divmod(length, n)
    return [c * base + min(c, rem) for c in range(n + 1)]


def chunk_sizes(length: int, ring_size: int, position: int) -> tuple[int, int]:
    """(chunk i, chunk 2d-1-i) sizes of one sequence at ring position i."""
    base, rem = divmod(length, 2 * ring_size)
    mirror = 2 * ring_size - 1 - position
    return base + (position < rem), base + (mirror < rem)


def local_lengths(lengths: Sequence[int], ring_size: int, position: int) -> list[int]:
    """Per-sequence tokens ring position i holds."""
    return [sum(chunk_sizes(n, ring_size, position)) for n in lengths]


def local_tokens(lengths: Sequence[int], ring_size: int, position: int) -> int:
    return sum(local_lengths(lengths, ring_size, position))


def max_local_tokens(lengths: Sequence[int], ring_size: int) -> int:
    """Tokens held by the ring position holding the most (all positions when d = 1)."""
    return max(local_tokens(lengths, ring_size, j) for j in range(ring_size))


@dataclass(frozen=True, kw_only=True)
class BlockCall:
    """One sequence's part of one ring step's attention kernel call."""

    q_len: int  # query rows of this sequence in the call
    k_len: int  # key rows of this sequence in the call
    causal: bool  # bottom-right aligned causal mask (the diagonal step only)


def owner(position: int, step: int, ring_size: int) -> int:
    return (position - step) % ring_size


def ring_step_calls(lengths: Sequence[int], ring_size: int, position: int,
                    step: int) -> list[BlockCall]:
    """Per-sequence kernel calls of ring step `step` at `position` (empty rows left out)."""
    r = owner(position, step, ring_size)
    out = []
    for n in lengths:
        qa, qb = chunk_sizes(n, ring_size, position)
        ka, kb = chunk_sizes(n, ring_size, r)
        if r == position:
            q, k = qa + qb, ka + kb
        elif r < position:
            q, k = qa + qb, ka
        else:
            q, k = qb, ka + kb
        if q > 0 and k > 0:
            out.append(BlockCall(q_len=q, k_len=k, causal=r == position))
    return out


def block_tokens(lengths: Sequence[int], ring_size: int, position: int) -> list[int]:
    """Rows of the KV block position i holds at each ring step (its owner's local tokens)."""
    held = all_local_tokens(lengths, ring_size)
    return [held[owner(position, s, ring_size)] for s in range(ring_size)]


def all_local_tokens(lengths: Sequence[int], ring_size: int) -> list[int]:
    """Tokens every ring position holds, in ring order."""
    return [local_tokens(lengths, ring_size, j) for j in range(ring_size)]


def stream_chunk_calls(lengths: Sequence[int], chunk_size: int) -> list[list[BlockCall]]:
    """The kernel calls of layer-wise StreamBP's query chunks (parallelism/streambp.py):
    chunk [a, b) attends, per sequence it touches, from that sequence's start to b."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    out = []
    for a in range(0, cu[-1], chunk_size):
        b = min(a + chunk_size, cu[-1])
        calls = []
        for s in range(len(lengths)):
            lo, hi = max(cu[s], a), min(cu[s + 1], b)
            if hi > lo:
                calls.append(BlockCall(q_len=hi - lo, k_len=hi - cu[s], causal=True))
        out.append(calls)
    return out
