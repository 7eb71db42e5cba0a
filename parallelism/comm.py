"""Point-to-point ring communication on ONE global process group (ByteScale's dynamic rings).

Why: a plan's rings change every micro-batch (ranks [2, 0, 3] now, rank 2 alone next), so
creating a process group per ring would cost a rendezvous per batch and leak communicators.
ByteScale instead keeps one global group and talks along each ring with point-to-point ops
addressed by global rank. `RingComm` is the one object through which ring algorithms talk:

    comm = RingComm(ring=[2, 0, 3], channel="kv")
    buf = comm.send_recv(k)        # queue: send k to the next member, receive from the previous
    comm.commit()                  # issue every queued op at once (batch_isend_irecv)
    ...compute while the transfer runs...
    comm.wait()                    # buf is valid only after this

Misuse raises `CommProtocolError` instead of deadlocking or reading a buffer still being
written: queueing while a batch is in flight, committing nothing or twice, waiting without a
commit, addressing a rank outside the ring or oneself. A peer that never answers (it names
another ring, or fails) turns into `RingCommError` once the process group's timeout expires,
naming the ring, the channel and the peers. Disjoint rings run concurrently because each
pair of ranks talks only inside one ring at a time; ops between one pair are matched in issue
order (NCCL) and by tag (gloo), and every member issues them in the same order.

Bytes sent and received are counted per channel in a caller-owned `CommStats` (for tests
and benchmarks); nothing here is a global singleton.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.distributed as dist

from parallelism.progress import PROGRESS

__all__ = [
    "CommProtocolError",
    "CommStats",
    "RingComm",
    "RingCommError",
    "check_ring",
    "current_rank_and_world",
    "ring_sum",
]


class CommProtocolError(RuntimeError):
    """The send / commit / wait protocol was used out of order (a programming error)."""


class RingCommError(RuntimeError):
    """A ring peer did not answer, or answered with something inconsistent."""


@dataclass(kw_only=True)
class CommStats:
    """Caller-owned counters of what one rank moved, per channel (e.g. 'kv', 'dkv')."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Payload bytes this rank sent, per channel."""
    bytes_received: dict[str, int] = field(default_factory=dict)
    """Payload bytes this rank received, per channel."""
    messages_sent: dict[str, int] = field(default_factory=dict)
    """Point-to-point send ops this rank issued, per channel."""

    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def add(self, channel: str, *, sent: int, received: int, messages: int) -> None:
        self.bytes_sent[channel] = self.bytes_sent.get(channel, 0) + sent
        self.bytes_received[channel] = self.bytes_received.get(channel, 0) + received
        self.messages_sent[channel] = self.messages_sent.get(channel, 0) + messages


def check_ring(ring: Sequence[int], rank: int, world_size: int) -> tuple[int, ...]:
    """Validate a ring (global ranks in ring order) for this rank; return it as a tuple."""
    if isinstance(ring, (str, bytes)) or not isinstance(ring, Sequence) or len(ring) == 0:
        raise ValueError(f"ring must be a non-empty list of global ranks, got {ring!r}")
    members = tuple(ring)
    bad = [r for r in members if isinstance(r, bool) or not isinstance(r, int)
           or not 0 <= r < world_size]
    if bad:
        raise ValueError(f"ring {list(members)} has entries {bad} that are not ranks of this "
                         f"world (valid: ints in [0, {world_size - 1}])")
    if len(set(members)) != len(members):
        raise ValueError(f"ring {list(members)} names a rank more than once")
    if rank not in members:
        raise ValueError(f"ring {list(members)} does not contain this rank ({rank}): every "
                         f"member calls with the same ring, non-members must not call")
    return members


class _State(Enum):
    IDLE = "idle"  # nothing queued
    QUEUED = "queued"  # ops queued, not issued
    IN_FLIGHT = "in_flight"  # issued, buffers owned by the backend until wait()


def current_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RingComm:
    """Send / commit / wait over one ring of global ranks on one process group."""

    def __init__(
        self,
        ring: Sequence[int],
        *,
        channel: str,
        group: dist.ProcessGroup | None = None,
        tag: int = 0,
        stats: CommStats | None = None,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        rank, world_size = current_rank_and_world()
        self.ring = check_ring(ring, rank, world_size)
        self.rank = rank
        self.channel = channel
        self.group = group
        self.tag = tag
        self.stats = stats
        self.timeout = timeout
        self.size = len(self.ring)
        self.position = self.ring.index(rank)
        self.next_rank = self.ring[(self.position + 1) % self.size]
        self.prev_rank = self.ring[(self.position - 1) % self.size]
        self._ops: list[dist.P2POp] = []
        self._works: list[dist.Work] = []
        self._in_flight_tensors: list[torch.Tensor] = []  # kept alive until wait()
        self._pending_peers: list[int] = []
        self._state = _State.IDLE

    def _peer(self, peer: int, verb: str) -> int:
        if self._state is _State.IN_FLIGHT:
            raise CommProtocolError(f"[{self.channel}] cannot {verb} while a committed batch is "
                                    f"in flight: call wait() first")
        if peer not in self.ring or peer == self.rank:
            raise CommProtocolError(f"[{self.channel}] cannot {verb} rank {peer}: peers must be "
                                    f"other members of ring {list(self.ring)} (this rank "
                                    f"is {self.rank})")
        return peer

    def _queue(self, op: dist.P2POp) -> None:
        # An empty tensor moves nothing; both sides know its size, so both skip it alike.
        if op.tensor.numel() > 0:
            self._ops.append(op)
        self._state = _State.QUEUED

    def send(self, tensor: torch.Tensor, *, to: int) -> None:
        """Queue sending `tensor` (contiguous; not to be modified until wait()) to `to`."""
        self._peer(to, "send to")
        if not tensor.is_contiguous():
            raise CommProtocolError(f"[{self.channel}] tensors sent must be contiguous")
        self._queue(dist.P2POp(dist.isend, tensor, to, self.group, self.tag))

    def recv(self, buffer: torch.Tensor, *, src: int) -> torch.Tensor:
        """Queue receiving into `buffer` from `src`; it holds the data only after wait()."""
        self._peer(src, "receive from")
        if not buffer.is_contiguous():
            raise CommProtocolError(f"[{self.channel}] receive buffers must be contiguous")
        self._queue(dist.P2POp(dist.irecv, buffer, src, self.group, self.tag))
        return buffer

    def send_recv(self, to_send: torch.Tensor, recv_buffer: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Queue one ring step: `to_send` goes to the next member, the previous one's arrives.

        The received block has `to_send`'s shape unless `recv_buffer` (any shape) is given.
        """
        buffer = torch.empty_like(to_send) if recv_buffer is None else recv_buffer
        # Receive before send: with gloo both are non-blocking anyway; with NCCL, ops inside
        # one batch are grouped, so the order only has to match across members (it does).
        self.recv(buffer, src=self.prev_rank)
        self.send(to_send, to=self.next_rank)
        return buffer

    def commit(self) -> None:
        """Issue every queued op as one batch; buffers belong to the backend until wait()."""
        if self._state is _State.IN_FLIGHT:
            raise CommProtocolError(f"[{self.channel}] commit() twice without wait()")
        if self._state is _State.IDLE:
            raise CommProtocolError(f"[{self.channel}] commit() with nothing queued")
        sent = sum(op.tensor.numel() * op.tensor.element_size() for op in self._ops
                   if op.op is dist.isend)
        received = sum(op.tensor.numel() * op.tensor.element_size() for op in self._ops
                       if op.op is dist.irecv)
        messages = sum(op.op is dist.isend for op in self._ops)
        self._works = dist.batch_isend_irecv(self._ops) if self._ops else []
        self._pending_peers = sorted({op.peer for op in self._ops})
        self._in_flight_tensors = [op.tensor for op in self._ops]
        self._ops = []
        self._state = _State.IN_FLIGHT
        if self.stats is not None:
            self.stats.add(self.channel, sent=sent, received=received, messages=messages)

    def wait(self) -> None:
        """Block until the committed batch is done; raise RingCommError if a peer is lost."""
        if self._state is not _State.IN_FLIGHT:
            raise CommProtocolError(f"[{self.channel}] wait() without a committed batch "
                                    f"(state: {self._state.value})")
        works, self._works = self._works, []
        self._state = _State.IDLE
        self._in_flight_tensors = []
        try:
            with PROGRESS.ring_wait():  # where a hang localisation sees it blocked
                for work in works:
                    if self.timeout is None:
                        work.wait()
                    else:
                        work.wait(self.timeout)
        except RuntimeError as exc:  # gloo/NCCL timeouts and peer failures land here
            raise RingCommError(
                f"rank {self.rank}, ring {list(self.ring)}, channel {self.channel!r}: "
                f"point-to-point exchange with ranks {self._pending_peers} failed ({exc}). "
                f"Do all members call with the same ring, in the same order, the same number "
                f"of times?"
            ) from exc

    @property
    def in_flight(self) -> bool:
        return self._state is _State.IN_FLIGHT

    def close(self) -> None:
        """Check that nothing is left queued or in flight (a lost transfer is a bug)."""
        if self._state is not _State.IDLE:
            raise CommProtocolError(f"[{self.channel}] closed with ops {self._state.value}: "
                                    f"every commit() needs a wait()")


def ring_sum(x: torch.Tensor, ring: Sequence[int], *, channel: str = "sum",
             group: dist.ProcessGroup | None = None, stats: CommStats | None = None
             ) -> torch.Tensor:
    """The sum of every ring member's `x` (same shape and dtype on each), bit-identical on
    every member: a ring all-gather (d - 1 send/recv steps on the global group, never a new
    group), then the blocks added in ring-position order, so no member rounds differently.

    For small per-sequence figures (a DPO pair's log-probability on a ring); it moves
    (d - 1) x numel elements per member.
    """
    comm = RingComm(ring, channel=channel, group=group, stats=stats)
    blocks = {comm.position: x}
    current = x.contiguous()
    for step in range(comm.size - 1):
        received = comm.send_recv(current)
        comm.commit()
        comm.wait()
        blocks[(comm.position - step - 1) % comm.size] = received
        current = received
    comm.close()
    total = blocks[0].clone()
    for position in range(1, comm.size):
        total += blocks[position]
    return total
