"""One attempt's elastic worlds as the plan streams see them (docs/elastic.md).

`AttemptWorlds` sits between controller.worker_service's RPC handlers and the pure
bookkeeping of controller.membership: for every plan-stream request it says what a rank
gets next (`Next`: form a world, a plan of some world, wait, or fenced off); it keeps the
history of worlds (which world ran which step), the planner pipelines by world size, how
far plans were sent in each world (a join starts after the last one sent), which members
wait for a new world after a peer vanished, and formation deadlines. Whatever changes
the world comes back as `Change`s (job events, whether to persist the membership) for the caller
to record once it has released the attempt's lock: nothing here does I/O.

Thread-safety: every method is called under the attempt's condition variable.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum

from controller.membership import Fallback, Membership, MembershipPolicy, WorldRecord
from controller.planning import PlanPipeline
from controller.spec import JobCreate
from controller.store import JobEvent

__all__ = ["AttemptWorlds", "Change", "Next", "policy_of"]


class Next(Enum):
    WORLD = "world"  # send the current World: the rank forms it, then reconnects
    PLAN = "plan"  # send the plan of the step asked for, in the rank's world
    WAIT = "wait"  # nothing yet (others forming, joiners waiting, plans ahead)
    FENCED = "fenced"  # the rank is no longer in the attempt


@dataclass(frozen=True, kw_only=True)
class Change:
    """What a caller records after a membership change (outside the lock)."""

    events: tuple[JobEvent, ...] = ()
    persist: bool = False  # the membership moved: store it (WorldKeeper.persist)
    fallback: str = ""  # non-empty: end the attempt (restart from the checkpoint)
    world: WorldRecord | None = None  # the new world, if one formed


def policy_of(spec: JobCreate) -> MembershipPolicy:
    f = spec.failure
    return MembershipPolicy(num_ranks=spec.resources.num_ranks, replan=f.mode == "replan",
                            max_lost_ranks=f.max_lost_ranks,
                            sharding=spec.resolve_optimizer_sharding(),
                            shard_mirror=spec.resolve_shard_mirror())


@dataclass(kw_only=True)
class AttemptWorlds:
    """See the module docstring."""

    spec: JobCreate
    attempt: int
    membership: Membership
    planner_pool: Executor
    history: dict[int, tuple[int, ...]] = field(default_factory=dict)  # epoch -> members
    pipelines: dict[int, PlanPipeline] = field(default_factory=dict)  # by world size
    sent: dict[int, int] = field(default_factory=dict)  # epoch -> newest step sent
    waiting_world: set[int] = field(default_factory=set)  # members whose step broke
    announced_at: float = 0.0  # when the current world was announced
    offered: set[int] = field(default_factory=set)  # epochs whose World an old member got
    make_pipeline: Callable[[JobCreate, Executor, int], PlanPipeline] | None = None

    def __post_init__(self) -> None:
        if self.membership.world is not None:
            w = self.membership.world
            self.history[w.epoch] = w.members

    # ----------------------------------------------------------------- views
    @property
    def world(self) -> WorldRecord | None:
        return self.membership.world

    def _current(self) -> WorldRecord:
        """The world, where there must be one (a World was sent, a step ran in it)."""
        w = self.membership.world
        assert w is not None, "no world before every rank has registered"
        return w

    def members_of(self, epoch: int) -> tuple[int, ...]:
        return self.history.get(epoch, ())

    def pipeline(self, world_size: int) -> PlanPipeline:
        if world_size not in self.pipelines:
            make = self.make_pipeline or (lambda s, ex, n: PlanPipeline(s, ex, world_size=n))
            self.pipelines[world_size] = make(self.spec, self.planner_pool, world_size)
        return self.pipelines[world_size]

    def previous_epoch(self) -> int | None:
        older = [e for e in self.history if self.world and e < self.world.epoch]
        return max(older) if older else None

    # ----------------------------------------------------------------- the stream
    def next_for(self, slot: int, epoch: int | None, attempted: int, step: int) -> Next:
        """What rank `slot` gets next. `epoch`: the world it formed (None: none yet);
        `attempted`: the newest World it acted on; `step`: the plan it asks for."""
        w = self.world
        if w is None:
            return Next.WAIT  # not every rank has registered yet
        state = self.membership.states.get(slot)
        if state == "lost":
            return Next.FENCED
        if slot not in w.members:
            return Next.WAIT  # a replacement waiting for the next step boundary
        if epoch == w.epoch:
            return Next.PLAN if w.complete else Next.WAIT
        if epoch is not None and epoch == self.previous_epoch() and w.boundary is not None \
                and step < w.boundary and slot in self.members_of(epoch):
            return Next.PLAN  # an old member's steps before a join's boundary
        if attempted >= w.epoch:
            return Next.WAIT  # forming this world failed here: a newer one will come
        if slot in w.joining and w.boundary is not None and w.epoch not in self.offered:
            return Next.WAIT  # a joiner forms once a member reached the join's boundary
        return Next.WORLD

    def world_sent(self, slot: int, now: float) -> None:
        """The current World went to `slot`. The first old member to get a join's World
        has reached its boundary: the joiners may form it, and its deadline starts."""
        w = self._current()
        if slot not in w.joining and w.epoch not in self.offered:
            self.offered.add(w.epoch)
            if w.boundary is not None:
                self.announced_at = now
        self.waiting_world.discard(slot)

    def plan_sent(self, epoch: int, step: int) -> None:
        self.sent[epoch] = max(self.sent.get(epoch, -1), step)

    def world_size_of(self, epoch: int) -> int:
        return len(self.members_of(epoch))

    # ----------------------------------------------------------------- changes
    def _event(self, kind: str, ranks, reason: str, step: int) -> JobEvent:
        w = self.world
        return JobEvent(kind=kind, attempt=self.attempt, epoch=w.epoch if w else -1,
                        step=step, ranks=tuple(sorted(ranks)),
                        world_size=w.size if w else 0, reason=reason)

    def registered(self, slot: int, *, checkpoint: bool, now: float) -> tuple[int, Change]:
        """A process of `slot` registered: (its incarnation, what changed). A new process
        of a member nobody reported lost is a loss first (its old process is gone)."""
        had_world = self.world is not None
        change = Change()
        if had_world and self.membership.states.get(slot) == "member":
            change = self.lose([slot], f"rank {slot} registered a new process",
                               step=self.newest_sent(), checkpoint=checkpoint, now=now)
        inc = self.membership.register(slot)
        if not had_world and self.world is not None:
            self._new_world(now)
            change = Change(world=self.world)
        return inc, Change(events=change.events, persist=True,
                           fallback=change.fallback, world=change.world)

    def lose(self, slots: list[int], reason: str, *, step: int, checkpoint: bool,
             now: float) -> Change:
        """Ranks lost: the events, and the new world or the fallback."""
        members = set(self.membership.members())
        lost = [s for s in slots if s in members or self.membership.states.get(s) == "waiting"]
        if not lost:
            return Change()
        out = self.membership.lose(lost, reason, checkpoint=checkpoint)
        events = [self._event("rank_lost", lost, reason, step)]
        if isinstance(out, Fallback):
            events.append(self._event("fallback_restart", lost, out.reason, step))
            return Change(events=tuple(events), persist=True,
                          fallback=out.reason)
        if out is None:
            return Change(events=tuple(events), persist=True)
        self._new_world(now)
        self.pipeline(out.size).prefetch(step)  # the re-plan of the interrupted step
        events.append(self._event("world_shrunk", lost, reason, step))
        return Change(events=tuple(events), persist=True, world=out)

    def fallback_event(self, reason: str, step: int) -> JobEvent:
        return self._event("fallback_restart", (), reason, step)

    def regroup_same(self, reason: str, *, step: int, now: float) -> Change:
        """Every member's step broke and nobody is lost: the same members, a new epoch."""
        w = self._current()
        self.membership.world = WorldRecord(epoch=w.epoch + 1, members=w.members,
                                            joining=w.joining, reason=reason)
        self._new_world(now)
        return Change(persist=True, world=self.world)

    def maybe_join(self, epoch: int, now: float) -> Change:
        """Replacements waiting and world `epoch` complete: a world with them."""
        w = self.world
        if w is None or w.epoch != epoch or not w.complete:
            return Change()
        assert w.start_step is not None, "a complete world was formed at a step"
        boundary = max(self.sent.get(epoch, w.start_step - 1) + 1, w.start_step)
        joined = self.membership.plan_join(boundary)
        if joined is None:
            return Change()
        self._new_world(now)
        self.pipeline(joined.size).prefetch(boundary)
        event = self._event("rank_joined", joined.joining, joined.reason, boundary)
        return Change(events=(event,), persist=True, world=joined)

    def formed(self, slot: int, epoch: int, step: int) -> bool:
        """`slot` formed world `epoch` at `step` (its stream reconnected in it); True when
        that completed the world."""
        self.waiting_world.discard(slot)
        return self.membership.formed(slot, epoch, step)

    def _new_world(self, now: float) -> None:
        w = self._current()
        self.history[w.epoch] = w.members
        self.announced_at = now
        self.waiting_world.clear()

    def newest_sent(self) -> int:
        """The newest step whose plan any rank received (-1: none)."""
        return max(self.sent.values(), default=-1)
