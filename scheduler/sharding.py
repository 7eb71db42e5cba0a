"""Data-aware sharding (ByteScale, arXiv 2502.21231, Alg. 1 and Eq. 3).

For every sequence of a global batch: the smallest ring size D(s) that makes the tokens
each member holds fit, and whether the members need a memory scheme to hold them. A rank
holds C = capacity_tokens tokens under the plain scheme and C_off under MEMO offload
(scheduler/rank_memory.py: model states plus the scheme's activation peak against the
device budget, and the host's share for the swapped activations). A shard records the
share r of its tokens' plain memory that must be freed, r = 1 - C D / s (0 when
s / D <= C), so that the token rule s (1 - r) / D <= C of the balance scheduler and the
packer still holds; any r > 0 runs MEMO offload (the group's scheme in the plan, with
MEMO's own alpha), which fits as long as s / D <= C_off. No power-of-two or
divisibility restriction: D(s) is any integer in 1..world_size. Sequences with D(s) = 1
are short and get best-fit packed onto single ranks (`best_fit_packs`).

Three policies:

- "auto": offload whenever it shrinks a ring: D(s) = ceil(s / C_off), the balance
  scheduler then enlarges rings where the recompute and copies cost more than the ranks
  (GPU clusters).
- "needed": offload only for a sequence that does not fit on every rank without it. The
  default for the `cpu` cluster preset, whose "host" and "device" are the same RAM.
- "never": no offload; a sequence longer than world_size x C is infeasible.

A sequence that does not fit on all ranks even with offload raises InfeasibleBatchError
naming it, its length and the largest length that fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scheduler.cost import CostModel
from scheduler.errors import InfeasibleBatchError, SpecError

OffloadPolicy = Literal["auto", "needed", "never"]
OFFLOAD_POLICIES = ("auto", "needed", "never")
RATIO_QUANTUM = 1e-6  # ratios are rounded up to this so the memory rule holds after rounding


@dataclass(frozen=True, kw_only=True)
class Shard:
    """How one sequence is sharded: its minimum ring and the offload that makes it fit."""

    seq_id: int  # index into the batch's lengths
    length: int  # tokens
    ring_size: int  # D(s): the smallest ring it fits on
    offload_ratio: float  # r: share of its activations sent to host memory


def validate_lengths(lengths: Sequence[int]) -> list[int]:
    """The batch as a list of ints; rejects empty batches and non-positive lengths."""
    out = [int(x) for x in lengths]
    if not out:
        raise SpecError("lengths: the batch is empty; give at least one sequence length")
    bad = [(i, x) for i, x in enumerate(out) if x < 1]
    if bad:
        i, x = bad[0]
        raise SpecError(f"lengths[{i}]={x}: every sequence length must be >= 1 "
                        f"({len(bad)} bad value(s))")
    return out


def _round_up_ratio(r: float) -> float:
    return min(1.0, math.ceil(max(0.0, r) / RATIO_QUANTUM - 1e-9) * RATIO_QUANTUM)


def max_fitting_length(*, capacity_tokens: int, offload_tokens: int, world_size: int,
                       offload: OffloadPolicy) -> int:
    """The longest sequence the whole cluster can hold under a policy."""
    per_rank = capacity_tokens if offload == "never" else max(capacity_tokens, offload_tokens)
    return per_rank * world_size


def shard_sequence(seq_id: int, length: int, *, capacity_tokens: int, world_size: int,
                   cost: CostModel, offload: OffloadPolicy = "auto",
                   offload_tokens: int | None = None) -> Shard:
    """Alg. 1 for one sequence: the smallest D (and the r it needs) that fits."""
    C, N, s = capacity_tokens, world_size, length
    if s <= C:
        return Shard(seq_id=seq_id, length=s, ring_size=1, offload_ratio=0.0)
    c_off = cost.offload_capacity_tokens() if offload_tokens is None else offload_tokens
    plain = math.ceil(s / C)
    if offload == "auto" and c_off > C and math.ceil(s / c_off) <= N:
        return _fit(seq_id, s, min(math.ceil(s / c_off), plain), C)
    if plain <= N:
        return Shard(seq_id=seq_id, length=s, ring_size=plain, offload_ratio=0.0)
    if offload != "never" and s <= N * c_off:
        return _fit(seq_id, s, N, C)
    raise InfeasibleBatchError(seq_id, s, max_fitting_length(
        capacity_tokens=C, offload_tokens=c_off, world_size=N, offload=offload))


def _fit(seq_id: int, length: int, ring_size: int, capacity: int) -> Shard:
    r = _round_up_ratio(1.0 - capacity * ring_size / length)
    return Shard(seq_id=seq_id, length=length, ring_size=ring_size, offload_ratio=r)


def shard_batch(lengths: Sequence[int], *, capacity_tokens: int, world_size: int,
                cost: CostModel, offload: OffloadPolicy = "auto") -> list[Shard]:
    """Alg. 1 over a batch: one Shard per sequence, in id order."""
    if offload not in OFFLOAD_POLICIES:
        raise SpecError(f"offload={offload!r} is not valid; valid: {', '.join(OFFLOAD_POLICIES)}")
    if capacity_tokens < 1:
        raise SpecError(f"capacity_tokens={capacity_tokens} must be >= 1")
    if world_size < 1:
        raise SpecError(f"world_size={world_size} must be >= 1 (number of ranks)")
    c_off = cost.offload_capacity_tokens()
    return [shard_sequence(i, s, capacity_tokens=capacity_tokens, world_size=world_size,
                           cost=cost, offload=offload, offload_tokens=c_off)
            for i, s in enumerate(validate_lengths(lengths))]


def best_fit_packs(shards: Sequence[Shard], *, capacity_tokens: int) -> list[list[Shard]]:
    """Best-fit decreasing: each short sequence goes into the fullest pack it fits."""
    import bisect

    packs: list[list[Shard]] = []
    free: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
    for sh in sorted(shards, key=lambda x: (-x.length, x.seq_id)):
        need = math.ceil(sh.length * (1.0 - sh.offload_ratio) - 1e-9)
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, p = free.pop(k)
            packs[p].append(sh)
            bisect.insort(free, (room - need, p))
        else:
            packs.append([sh])
            bisect.insort(free, (capacity_tokens - need, len(packs) - 1))
    return packs
