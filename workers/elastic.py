"""Elastic worlds on the rank side: a lost rank costs one step, not a restart.

A *world* is one membership of a job attempt: an epoch number, the member slots in
process-group rank order, and a fresh rendezvous prefix in the attempt's TCPStore. Each
slot is one rank actor (its id survives a restart of its process). Whoever coordinates
(the controller over gRPC, or a local workers.group.WorkerGroup) announces a new world
when a rank is lost or a replacement is ready; every member then calls
`ElasticRank.join(world)`, which

1. leaves the old process group (NCCL: aborts its communicator first, so pending work
   returns) and joins the new one on the new prefix: no process restart;
2. tells the other members what it holds (`RankStatus`, one all_gather_object);
3. settles the optimizer layout: a layout built for an earlier world is *live* on a rank
   once that world's final vote completed there; a rank whose vote was interrupted keeps
   the previous layout too (a *candidate*), and promotes the candidate if any member
   reports it live, else drops it;
4. settles the step that was in flight when the world broke (`settle_step`): the last
   collective before any state change is the grad-norm all-reduce (distributed) or the
   loss totals (none, zero1); a rank that completed it committed the update, and since
   every rank contributed to it, every rank holds what it needs to commit too (its
   reduced gradient shard, and the mirror's). So if any member committed step t, the
   others commit it with that member's norm and step t counts as done; otherwise every
   member drops it (partial gradients discarded, optimizer untouched) and it is rerun;
5. reshards: a new optimizer for the new world, its masters and moments sent from the
   live holders of the old layout (workers.reshard), the compute parameters published
   again, and a final one-element all-reduce (the vote) after which the new layout is
   live and the old one is freed. Elements no live rank holds (no mirror: the lost
   rank's shard) come back from the checkpoint, moments only (masters are the live
   compute parameters); with the mirror on, or without a checkpoint, `Unrecoverable`.

Joiners (a replacement, or every rank when an attempt starts) hold nothing: they build a
fresh trainer and receive everything; a world where nobody holds state restores the
checkpoint (or starts from step 0).

Concurrency: everything runs on the rank's main thread, between steps or after a step
was interrupted; all collectives are on the new world's default process group.
"""

from __future__ import annotations

import datetime
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from parallelism.comm import RingCommError
from scheduler.batching import BatchPosition
from scheduler.model_states import has_mirror
from workers import gloo_abort
from workers.optim import ShardedAdamW, StateInterval, state_intervals
from workers.reshard import Missing, plan_transfers, run_transfers
from workers.train import Trainer

__all__ = ["ElasticRank", "JoinReport", "Layout", "RankStatus", "Unrecoverable", "World",
           "comm_failure", "is_comm_failure", "leave_process_group"]


class Unrecoverable(RuntimeError):
    """The new world cannot be formed from what the live ranks hold (restart instead)."""


@dataclass(frozen=True, kw_only=True)
class World:
    """One membership of a job attempt."""

    epoch: int  # grows by one with every membership change
    members: tuple[int, ...]  # slots, in process-group rank order
    store_prefix: str  # the epoch's rendezvous prefix in the attempt's TCPStore

    def rank_of(self, slot: int) -> int:
        return self.members.index(slot)

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Layout:
    """The world an optimizer's state is laid out for."""

    epoch: int
    members: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class FlightStatus:
    step: int
    committed: bool
    published: bool
    norm: float | None
    loss: float | None
    num_predictions: int
    next_position: tuple[int, int] | None


@dataclass(frozen=True)
class _Candidate:
    """A new optimizer of `trainer` built for `layout`, not yet confirmed by the vote, and
    the one it replaces (None: a joiner's fresh trainer, which has no older state)."""

    layout: Layout
    trainer: Trainer
    new: ShardedAdamW
    old: ShardedAdamW | None


@dataclass(frozen=True, kw_only=True)
class RankStatus:
    """What a member tells the others when a world forms."""

    slot: int
    live: Layout | None  # the layout its optimizer state is in; None: holds nothing
    candidate: Layout | None  # a newer layout built but not confirmed by its vote
    step: int  # optimizer steps completed
    position: tuple[int, int]  # data position (epoch, index)
    flight: FlightStatus | None  # the step in flight when the old world broke


@dataclass(frozen=True, kw_only=True)
class JoinReport:
    """What forming a world did on this rank."""

    world: World
    step: int  # optimizer steps completed when the world starts
    finished: FlightStatus | None  # an interrupted step this rank finished (report it)
    dropped_step: int | None  # an interrupted step dropped everywhere (it reruns)
    from_checkpoint: bool  # state read from a checkpoint (fresh world, or lost shards)
    bytes_received: int  # optimizer-state bytes received from other ranks
    bytes_sent: int
    param_bytes: int  # the compute parameters published again (all-gather payload)
    seconds: float


def leave_process_group(backend: str) -> None:
    """Abandon the default process group (NCCL: abort its communicator first)."""
    if not dist.is_initialized():
        return
    if backend == "nccl":  # pending NCCL work returns instead of waiting on a lost peer
        dist.distributed_c10d._abort_process_group()
    dist.destroy_process_group()


_COMM_SIGNS = ("gloo", "Connection closed", "Connection reset", "Timed out", "NCCL",
               "Broken pipe", "connection refused")


def is_comm_failure(exc: BaseException) -> bool:
    """A collective or ring transfer broke (a peer vanished), not a bug of this rank."""
    if isinstance(exc, (RingCommError, dist.DistError)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _COMM_SIGNS)


def comm_failure(fn: Callable[[], object]) -> str:
    """Run `fn`: '' on success, the message of a communication failure (anything else is
    re-raised). The caller handles the failure outside this function's except block,
    whose traceback would still hold the broken process group."""
    try:
        fn()
    except Exception as exc:
        if not is_comm_failure(exc):
            raise
        return str(exc)
    return ""


def _gather_objects(mine: list) -> list[list]:
    """Every member's `mine` (all_gather_object over the default group)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _flight_status(trainer: Trainer) -> FlightStatus | None:
    f = trainer.in_flight
    if f is None:
        return None
    pos = f.next_position
    return FlightStatus(step=f.step, committed=f.committed, published=f.published,
                        norm=f.norm, loss=f.stats.loss if f.stats else None,
                        num_predictions=f.stats.num_predictions if f.stats else 0,
                        next_position=(pos.epoch, pos.index) if pos is not None else None)


class ElasticRank:
    """One slot's trainer across worlds (see the module docstring).

    `make_trainer(fresh=)` builds a Trainer on the current default process group: a
    joiner's (`fresh=False`: its weights will be sent), or everyone's at the start of an
    attempt (`fresh=True`, collectively); `store` is the attempt's TCPStore client.
    """

    def __init__(self, *, slot: int, store: dist.Store, backend: str, timeout_s: float,
                 make_trainer: Callable[..., Trainer],
                 on_statuses: Callable[[World, list[RankStatus]], None] | None = None):
        self.slot, self.store, self.backend = slot, store, backend
        self.timeout_s, self.make_trainer = timeout_s, make_trainer
        self.on_statuses = on_statuses  # fault drills: called once the members are known
        self.trainer: Trainer | None = None
        self.world: World | None = None
        self.live: Layout | None = None  # layout of the live optimizer
        self.candidate: _Candidate | None = None
        self.restored = False  # the last join read state from a checkpoint
        # (world epoch, the gloo group's pair connections): one tuple, so that another
        # thread (interrupt) never pairs one world's epoch with another's connections
        self._group: tuple[int, dict[int, gloo_abort.Endpoints]] = (-1, {})

    def joined(self) -> tuple[Trainer, World]:
        """The trainer and the world of the last join (a world has formed on this rank)."""
        if self.trainer is None or self.world is None:
            raise RuntimeError(f"slot {self.slot} has not formed a world yet (join first)")
        return self.trainer, self.world

    def abandon(self) -> None:
        """Leave the current process group now (a step broke on a vanished peer): its
        connections close, so peers still blocked on this rank fail at once instead of
        waiting for the process-group timeout. The optimizer and the step in flight stay
        as they are until the next world is formed.

        gloo: the group's pair connections are shut down (workers.gloo_abort); NCCL: its
        communicator is aborted (leave_process_group)."""
        if self.backend == "gloo":
            gloo_abort.shut_down(self._group[1])
        self._group = (-1, {})
        gc.collect()  # a broken step's frames may still hold the group
        leave_process_group(self.backend)

    def interrupt(self, broken_below: int) -> bool:
        """From another thread (the heartbeat): if this rank's group belongs to a world
        older than `broken_below` (the controller formed a new one without a lost rank),
        shut its connections down, so that a step blocked on a lost peer that is still
        alive (a stalled rank, whose sockets stay open) fails now and the rank goes on to
        the new world. Only the connections recorded for that world are touched; True if
        any was. gloo only (NCCL: the watchdog, docs/elastic.md)."""
        epoch, connections = self._group
        if self.backend != "gloo" or epoch < 0 or epoch >= broken_below:
            return False
        return gloo_abort.shut_down(connections) > 0

    # ----------------------------------------------------------------- the join
    def join(self, world: World, *, checkpoint: str | None = None) -> JoinReport:
        """Form `world` with the other members (collective; see the module docstring)."""
        t0 = time.perf_counter()
        self._connect(world)
        statuses = self._exchange()
        if self.on_statuses is not None:
            self.on_statuses(world, statuses)
        source = self._settle_layout(statuses)
        finished, dropped = self._settle_step(statuses, source)
        report = self._form(world, statuses, source, checkpoint)
        return replace(report, finished=finished, dropped_step=dropped,
                       seconds=time.perf_counter() - t0)

    def _connect(self, world: World) -> None:
        leave_process_group(self.backend)
        before = gloo_abort.open_sockets() if self.backend == "gloo" else {}
        dist.init_process_group(
            self.backend, store=dist.PrefixStore(world.store_prefix, self.store),
            rank=world.rank_of(self.slot), world_size=world.size,
            timeout=datetime.timedelta(seconds=self.timeout_s))
        # NCCL wants one collective over every rank before any point-to-point op; it also
        # checks that every member arrived (and gloo has connected every pair by then).
        dist.barrier()
        if self.backend == "gloo":
            self._group = (world.epoch,
                           gloo_abort.group_connections(before, _gather_objects))
        self.world = world
        if self.trainer is not None:
            self.trainer.rank = world.rank_of(self.slot)

    def _status(self) -> RankStatus:
        t = self.trainer
        pos = t.data_position if t is not None else BatchPosition()
        return RankStatus(slot=self.slot, live=self.live,
                          candidate=self.candidate.layout if self.candidate else None,
                          step=t.step if t is not None and self.live else 0,
                          position=(pos.epoch, pos.index),
                          flight=_flight_status(t) if t is not None and self.live else None)

    def _exchange(self) -> list[RankStatus]:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, self._status())
        return out

    # ----------------------------------------------------------------- layouts
    def _settle_layout(self, statuses: list[RankStatus]) -> Layout | None:
        """The layout the members' state is in (promoting or dropping candidates)."""
        lives = [s.live for s in statuses if s.live is not None]
        if not lives:
            self._drop_candidate()
            return None
        source = max(lives, key=lambda layout: layout.epoch)
        if self.candidate and self.candidate.layout == source:
            self._promote(self.candidate)
        elif self.candidate:
            self._drop_candidate()
        if self.live is not None and self.live != source:
            raise Unrecoverable(f"slot {self.slot} holds state of world {self.live.epoch} but "
                                f"the members' newest is world {source.epoch}")
        return source

    def _promote(self, c: _Candidate) -> None:
        if c.old is not None:
            c.old.release()
        c.trainer.optimizer, self.live, self.candidate = c.new, c.layout, None

    def _drop_candidate(self) -> None:
        c = self.candidate
        if c is None:
            return
        c.new.release()
        if c.old is None:  # a joiner's fresh trainer: nothing of it is worth keeping
            self.trainer = None
        else:
            c.old.rebind()
            c.trainer.optimizer = c.old
            c.trainer.rebuild_arenas()
        self.candidate = None

    # ----------------------------------------------------------------- the step in flight
    def _settle_step(self, statuses: list[RankStatus], source: Layout | None
                     ) -> tuple[FlightStatus | None, int | None]:
        """Finish the interrupted step everywhere or drop it everywhere."""
        flights = [s.flight for s in statuses if s.flight is not None]
        done = [f for f in flights if f.committed]
        dropped = None if done else (flights[0].step if flights else None)
        ref = max(done, key=lambda f: f.step, default=None)  # the first of the newest
        trainer = self.trainer if self.live else None
        mine = trainer.in_flight if trainer is not None else None
        if trainer is None or mine is None:
            return None, dropped
        if ref is None or mine.step != ref.step:
            # dropped everywhere (its gradients are overwritten next step), or a later step
            # that cannot have committed
            trainer.in_flight = None
            return None, dropped
        if not mine.committed:
            assert ref.norm is not None, "a committed step's status carries its norm"
            trainer.commit(ref.norm)
        trainer.finish_step()
        return replace(ref, committed=True), None

    # ----------------------------------------------------------------- the new layout
    def _form(self, world: World, statuses: list[RankStatus], source: Layout | None,
              checkpoint: str | None) -> JoinReport:
        self.restored = bool(checkpoint) and source is None
        trainer = self.trainer
        if trainer is None:
            trainer = self.trainer = self.make_trainer(fresh=source is None)
            new, old = trainer.optimizer, None
        else:
            old = trainer.optimizer
            new = trainer.build_optimizer()
        candidate = self.candidate = _Candidate(Layout(world.epoch, world.members), trainer,
                                                new, old)
        trainer.rebuild_arenas()
        if source is None:
            if checkpoint:
                trainer.restore(checkpoint)
            received = sent = 0
        else:
            received, sent = self._move_state(candidate, world, statuses, source, checkpoint)
            self._adopt_progress(trainer, statuses)
            new.params_from_masters()
            new.publish()
        _vote(trainer)
        self._promote(candidate)
        return JoinReport(world=world, step=trainer.step, finished=None,
                          dropped_step=None, from_checkpoint=self.restored,
                          bytes_received=received, bytes_sent=sent,
                          param_bytes=_publish_bytes(new), seconds=0.0)

    def _move_state(self, c: _Candidate, world: World, statuses: list[RankStatus],
                    source: Layout, checkpoint: str | None) -> tuple[int, int]:
        """The candidate's masters and moments from the live holders of `source`, or the
        checkpoint; (bytes received, bytes sent)."""
        trainer, old, new = c.trainer, c.old, c.new
        holders = {world.rank_of(s.slot) for s in statuses if s.live == source}
        flag = trainer.config.shard_mirror
        transfers, missing = plan_transfers(_needs(new, world.size, flag),
                                            _holds(new, source, world, holders, flag))
        if missing:
            self._restore_missing(trainer, missing, statuses, source, checkpoint)
            self.restored = True
        stats = run_transfers(transfers, world.rank_of(self.slot),
                              old=_parts(old) if old is not None else None, new=_parts(new))
        if missing:
            _masters_from_params(new, [m for m in missing if m.dst == new.rank])
        return stats.bytes_received, stats.bytes_sent

    def _restore_missing(self, trainer: Trainer, missing: list[Missing],
                         statuses: list[RankStatus], source: Layout, checkpoint: str | None
                         ) -> None:
        lost = sorted(set(source.members) - {s.slot for s in statuses if s.live == source})
        what = (f"{sum(m.hi - m.lo for m in missing)} optimizer elements of lost slot(s) "
                f"{lost}")
        opt = trainer.optimizer
        if has_mirror(sharding=opt.sharding, world_size=len(source.members),
                      shard_mirror=trainer.config.shard_mirror):
            raise Unrecoverable(f"{what}: a shard and its mirror are both lost")
        if not checkpoint:
            raise Unrecoverable(f"{what} are held by no live rank and there is no "
                                "checkpoint to read them from")
        if any(s.flight and s.flight.committed and not s.flight.published for s in statuses):
            raise Unrecoverable(f"{what}: the interrupted step's parameters of those elements "
                                "were never published")
        from workers.checkpoint import load_optimizer_state

        load_optimizer_state(checkpoint, trainer)

    def _adopt_progress(self, trainer: Trainer, statuses: list[RankStatus]) -> None:
        """A joiner takes the members' step count and data position."""
        if self.live is not None:
            return
        ref = next(s for s in statuses if s.live is not None)
        step, position = ref.step, ref.position
        if ref.flight and ref.flight.committed:  # settled by the others after the exchange
            step = ref.flight.step + 1
            position = ref.flight.next_position or position
        trainer.step = step
        trainer.data_position = BatchPosition(epoch=position[0], index=position[1])


def _vote(trainer: Trainer) -> None:
    """Every member finished its transfers: the new layout is complete everywhere."""
    vote = torch.ones(1, device=next(trainer.model.parameters()).device)
    dist.all_reduce(vote)
    if int(vote.item()) != dist.get_world_size():
        raise RuntimeError(f"world vote counted {int(vote.item())} members")


def _numels(opt: ShardedAdamW) -> list[int]:
    return [p.numel() for p in opt.params]


def _needs(new: ShardedAdamW, size: int, mirror: bool) -> dict[int, list[StateInterval]]:
    return {p: state_intervals(_numels(new), sharding=new.sharding, world_size=size, rank=p,
                               shard_mirror=mirror) for p in range(size)}


def _holds(new: ShardedAdamW, source: Layout, world: World, holders: set[int], mirror: bool
           ) -> dict[int, list[StateInterval]]:
    """What each live holder (by its new rank) has of the source layout."""
    n = len(source.members)
    out = {}
    for q, slot in enumerate(source.members):
        if slot in world.members and world.rank_of(slot) in holders:
            out[world.rank_of(slot)] = state_intervals(
                _numels(new), sharding=new.sharding, world_size=n, rank=q, shard_mirror=mirror)
    return out


def _parts(opt: ShardedAdamW) -> dict[str, dict[str, torch.Tensor]]:
    out = {"own": opt.part("own")}
    if opt.shard_mirror:
        out["mirror"] = opt.part("mirror")
    return out


@torch.no_grad()
def _masters_from_params(opt: ShardedAdamW, missing: list[Missing]) -> None:
    """Masters of elements no live rank held: the live compute parameters (upcast)."""
    if "masters" not in opt.state_tensors():
        return  # fp32/fp64: the masters are the parameters
    for m in missing:
        if m.part != "own":
            continue
        for s in opt.segments:
            lo, hi = max(m.offset, s.start), min(m.offset + m.hi - m.lo, s.stop)
            if lo < hi:
                at = s.param_start + lo - s.start
                opt.master[lo:hi].copy_(opt.param_buffer[at:at + hi - lo])


def _publish_bytes(opt: ShardedAdamW) -> int:
    if opt.world_size == 1 or opt.sharding == "none":
        return 0
    return opt.param_buffer.numel() * opt.param_buffer.element_size()
