"""Moving optimizer state from one world's layout to another's (shrink, rejoin).

Why it exists: when a world changes (a rank lost, a replacement joined) the optimizer's
masters and moments are laid out for the old world (each rank's own range, and under the
shard mirror a copy of the previous owner's); the new world needs them laid out for its
size. Everything is addressed in one coordinate system, the model-order flat parameter
vector (workers.optim.state_intervals): what old position q held and what new position p
needs are pure functions of the parameter sizes, the sharding and the two worlds, so every
rank computes the same transfer plan with no exchange of metadata.

`plan_transfers` picks, for every element a new rank needs, a live holder (itself first,
then an owner, then a mirror), and reports what no live rank holds (`missing`).
`run_transfers` executes the plan: one packed buffer per pair of ranks and direction, all
posted at once (batch_isend_irecv), then unpacked; copies within a rank are local. Old
and new state tensors coexist while it runs (the old optimizer is dropped by the caller
once the new world is confirmed, workers.elastic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.optim import STATE_KINDS, StateInterval

__all__ = ["Missing", "Transfer", "TransferStats", "plan_transfers", "run_transfers"]


@dataclass(frozen=True)
class Transfer:
    """Elements [lo, hi) of the flat parameter vector, from one rank's state to another's."""

    src: int  # rank (new world) that holds them
    dst: int  # rank (new world) that needs them
    lo: int
    hi: int
    src_part: str  # "own" or "mirror" of the source's old optimizer
    src_offset: int  # where `lo` sits in that part
    dst_part: str  # "own" or "mirror" of the destination's new optimizer
    dst_offset: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Missing:
    """Elements no live rank holds: they come back from a checkpoint (or cannot)."""

    dst: int
    lo: int
    hi: int
    part: str
    offset: int


@dataclass(frozen=True, kw_only=True)
class TransferStats:
    bytes_sent: int  # state bytes this rank sent to others
    bytes_received: int  # state bytes it received from others
    bytes_copied: int  # state bytes it copied from its own old state (no traffic)


def _sources(dst: int, holds: Mapping[int, Sequence[StateInterval]]):
    """(src, interval) in preference order: the rank itself (no traffic), then the other
    ranks' own ranges, then their mirrors."""
    yield from ((dst, h) for h in holds.get(dst, ()))
    for part in ("own", "mirror"):
        for src in sorted(s for s in holds if s != dst):
            yield from ((src, h) for h in holds[src] if h.part == part)


def plan_transfers(needs: Mapping[int, Sequence[StateInterval]],
                   holds: Mapping[int, Sequence[StateInterval]],
                   ) -> tuple[list[Transfer], list[Missing]]:
    """Cover every needed interval from live holders; the plan every rank computes alike.

    `needs[p]`: what new rank p's optimizer needs; `holds[q]`: what the live rank q (new
    world rank) holds of the old layout. Returns the transfers, in a deterministic order,
    and the pieces nobody holds.
    """
    transfers: list[Transfer] = []
    missing: list[Missing] = []
    for dst in sorted(needs):
        for need in needs[dst]:
            pieces = [(need.lo, need.hi)]
            for src, h in _sources(dst, holds):
                pieces = _cover(pieces, need, src, dst, h, transfers)
                if not pieces:
                    break
            missing += [Missing(dst=dst, lo=a, hi=b, part=need.part,
                                offset=need.offset + a - need.lo) for a, b in pieces]
    return transfers, missing


def _cover(pieces, need: StateInterval, src: int, dst: int, h: StateInterval,
           out: list[Transfer]) -> list[tuple[int, int]]:
    """Emit the parts of `pieces` that `h` holds; return what is still uncovered."""
    left = []
    for a, b in pieces:
        lo, hi = max(a, h.lo), min(b, h.hi)
        if lo >= hi:
            left.append((a, b))
            continue
        out.append(Transfer(src=src, dst=dst, lo=lo, hi=hi, src_part=h.part,
                            src_offset=h.offset + lo - h.lo, dst_part=need.part,
                            dst_offset=need.offset + lo - need.lo))
        left += [(x, y) for x, y in ((a, lo), (hi, b)) if x < y]
    return left


def _slices(parts: Mapping[str, Mapping[str, torch.Tensor]], part: str, offset: int,
            numel: int) -> list[torch.Tensor]:
    return [parts[part][k][offset:offset + numel] for k in STATE_KINDS]


def run_transfers(transfers: Sequence[Transfer], rank: int, *,
                  old: Mapping[str, Mapping[str, torch.Tensor]] | None,
                  new: Mapping[str, Mapping[str, torch.Tensor]], group=None) -> TransferStats:
    """Execute this rank's share of `transfers` (collective over the new world).

    `old` / `new`: part -> STATE_KINDS name -> tensor (workers.optim.ShardedAdamW.part) of
    this rank's old and new optimizer (`old` None for a rank that holds nothing).
    """
    sends: dict[int, list[Transfer]] = {}
    recvs: dict[int, list[Transfer]] = {}
    copied = 0
    # `old` is None only on a rank that holds nothing, which no transfer reads from
    sources = old if old is not None else {}
    for t in transfers:
        if t.src == rank and t.dst == rank:
            for d, s in zip(_slices(new, t.dst_part, t.dst_offset, t.numel),
                            _slices(sources, t.src_part, t.src_offset, t.numel), strict=True):
                d.copy_(s)
                copied += s.numel() * s.element_size()
        elif t.src == rank:
            sends.setdefault(t.dst, []).append(t)
        elif t.dst == rank:
            recvs.setdefault(t.src, []).append(t)
    ref = next(iter(next(iter(new.values())).values()))
    ops, out_bufs, in_bufs = [], {}, {}
    for peer, ts in sorted(sends.items()):
        out_bufs[peer] = torch.cat([x for t in ts for x in _slices(sources, t.src_part,
                                                                  t.src_offset, t.numel)])
        ops.append(dist.P2POp(dist.isend, out_bufs[peer], peer, group))
    for peer, ts in sorted(recvs.items()):
        in_bufs[peer] = torch.empty(len(STATE_KINDS) * sum(t.numel for t in ts),
                                    dtype=ref.dtype, device=ref.device)
        ops.append(dist.P2POp(dist.irecv, in_bufs[peer], peer, group))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    for peer, ts in recvs.items():
        _unpack(in_bufs[peer], ts, new)
    size = ref.element_size()
    return TransferStats(bytes_sent=sum(b.numel() for b in out_bufs.values()) * size,
                         bytes_received=sum(b.numel() for b in in_bufs.values()) * size,
                         bytes_copied=copied)


def _unpack(buf: torch.Tensor, ts: Sequence[Transfer], new) -> None:
    at = 0
    for t in ts:
        for d in _slices(new, t.dst_part, t.dst_offset, t.numel):
            d.copy_(buf[at:at + t.numel])
            at += t.numel
