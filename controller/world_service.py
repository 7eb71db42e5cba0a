"""The worker service's side of elastic worlds (docs/elastic.md): what a plan stream sends
next, lost and stalled ranks, replacements joining, the fallback to a restart.

`WorldKeeper` works on one attempt's runtime (controller.attempt_runtime.AttemptRuntime)
for the gRPC handlers: controller.worlds says what changes, this module applies it under
the attempt's lock and records it outside (job events, the persisted membership, a log
line and a `job.world_change` span per event). It never ends an attempt itself: the
service's `lose` callback does (WORKER_LOST to the launcher), and `finish_step` completes
a step whose last missing report was a lost rank's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from opentelemetry import propagate

from controller.rpc import ringmaster_pb2 as pb
from controller.states import JobRecord
from controller.store import JobStore
from controller.worlds import Change, Next

log = logging.getLogger(__name__)

# How long a plan stream waiting on a world (others forming it, a join's boundary) sleeps
# before it looks again; membership changes wake it sooner.
WORLD_WAKE_S = 0.5


def lost_slots(rt) -> set[int]:
    """Slots the attempt's membership has declared lost (caller holds rt.cond)."""
    return {s for s, state in rt.worlds.membership.states.items() if state == "lost"}


def live_members(rt, epoch: int | None) -> list[int]:
    """Members of world `epoch` not lost since; every rank before a world formed (caller
    holds rt.cond)."""
    lost = lost_slots(rt)
    members = rt.worlds.members_of(epoch) if epoch is not None else ()
    return [s for s in members if s not in lost] or list(rt.ranks)


def changed(rt) -> None:
    """Done steps or membership moved (caller holds rt.cond): forget the cached minimum
    done step of each world and wake the plan streams."""
    rt.min_done.clear()
    rt.cond.notify_all()


class WorldKeeper:
    """See the module docstring."""

    def __init__(self, *, store: JobStore, tracer, clock: Callable[[], float],
                 lose: Callable, finish_step: Callable, localise: Callable):
        self.store, self.tracer, self.clock = store, tracer, clock
        self._lose, self._finish_step, self._localise = lose, finish_step, localise

    # ----------------------------------------------------------------- plan streams
    def next(self, rt, slot: int, epoch: int | None, attempted: int, step: int) -> Next:
        """What the stream sends next; a replacement waiting joins when it can."""
        with rt.cond:
            nxt = rt.worlds.next_for(slot, epoch, attempted, step)
            change = Change()
            if nxt is Next.PLAN and rt.worlds.world.epoch == epoch \
                    and rt.worlds.membership.waiting():
                change = rt.worlds.maybe_join(epoch, self.clock())
                if change.world is not None:
                    self.reset_progress(rt)
                    changed(rt)
                    nxt = rt.worlds.next_for(slot, epoch, attempted, step)
        self.record(rt, change)
        return nxt

    def world_done(self, rt, slot: int) -> bool:
        """A replacement still waiting when every member has finished the job's steps."""
        with rt.cond:
            members = rt.worlds.membership.members()
            return bool(members) and slot not in members and all(
                rt.ranks[s].finished for s in members)

    def world_message(self, rt, slot: int, step: int) -> pb.PlanMessage:
        with rt.cond:
            w = rt.worlds.world
            rt.worlds.world_sent(slot, self.clock())
            rt.ranks[slot].progress_at = self.clock()
        return pb.PlanMessage(step=step, world=pb.World(
            epoch=w.epoch, members=list(w.members), store_prefix=w.store_prefix,
            joining=list(w.joining), reason=w.reason,
            checkpoint=rt.job.last_checkpoint or "",
            start_step=w.boundary if w.boundary is not None else -1))

    def stream_formed(self, rt, slot: int, epoch: int | None, step: int) -> None:
        """A rank (re)connects after acting on World `epoch` (None: none formed yet);
        record what its forming completed, or fall back if the members disagree."""
        with rt.cond:
            try:
                completed = epoch is not None and rt.worlds.formed(slot, epoch, step)
            except ValueError as exc:  # the members disagree on where the world starts
                completed, disagree = False, str(exc)
            else:
                disagree = ""
            w = rt.worlds.world
            rt.min_done.clear()  # its done step may have moved (it resumed past a step)
            # The members waiting for this world wait for it to be complete: one member's
            # forming wakes nobody else (N wake-ups per member would be N^2 per world).
            if completed or w is None or w.complete or w.epoch != epoch:
                rt.cond.notify_all()
        if disagree:
            self.fall_back(rt, disagree, step)
        if epoch is not None:
            self.persist(rt)
        if completed:
            self.store.append_logs(rt.job.id, [f"world {epoch} formed at step {step}: ranks "
                                               f"{list(rt.worlds.members_of(epoch))}"])

    # ----------------------------------------------------------------- losses
    def check(self, rt) -> None:
        """Replan mode: find the rank that stopped first (the others wait on it), a world
        that did not form in time, replacements gone silent."""
        timeout = rt.job.spec.failure.heartbeat_timeout_s
        now = self.clock()
        with rt.cond:
            verdict = stalled(rt, now, timeout)
        if verdict is None:
            return
        kind, ranks, message = verdict
        if kind == "stall":
            ranks, message = self._blame(rt, ranks, message, now, timeout)
            kind = "lose"
        if kind == "regroup":
            with rt.cond:
                change = rt.worlds.regroup_same(message, step=self.step_of(rt), now=now)
                self.reset_progress(rt)
                changed(rt)
            self.record(rt, change)
        else:
            self.ranks_lost(rt, ranks, message)

    def _blame(self, rt, ranks: list[int], message: str, now: float, timeout: float
               ) -> tuple[list[int], str]:
        """A stall: whom the ranks' positions say the others wait on (controller.hang),
        when the world is the attempt's full one (its ranks are the slots) and that rank's
        progress stopped too; else the rank whose progress stopped first."""
        w = rt.worlds.world
        if w.members != tuple(range(len(rt.ranks))):
            return ranks, message
        report = self._localise(rt, now, timeout)
        late = [r for r in (report.culprit_ranks if report else ())
                if now - rt.ranks[r].progress_at > timeout]  # a culprit is stalled too
        if not late:
            return ranks, message
        blamed = late[0]
        idle = now - rt.ranks[blamed].progress_at
        return [blamed], (f"step {report.step} hung: {report.message}. Rank {blamed} made no "
                          f"progress for {idle:.1f} s (heartbeat_timeout_s={timeout:g}); "
                          "presumed stalled")

    def step_of(self, rt) -> int:
        """The step the current world is working on (its members' first unfinished)."""
        members = rt.worlds.membership.members() or tuple(rt.ranks)
        return min(rt.ranks[s].done_step for s in members) + 1

    def reset_progress(self, rt) -> None:
        now = self.clock()
        for st in rt.ranks.values():
            st.progress_at = now

    def ranks_lost(self, rt, ranks: list[int], reason: str) -> None:
        """`ranks` are gone: the survivors' new world, or the fallback."""
        with rt.cond:
            step = self.step_of(rt)
            change = rt.worlds.lose(ranks, reason, step=step,
                                    checkpoint=bool(rt.job.last_checkpoint), now=self.clock())
            self.reset_progress(rt)
            changed(rt)
            pending = sorted(rt.pending)
        self.record(rt, change)
        for s in pending:  # the lost rank may have been the last one a step waited for
            self._finish_step(rt, s)

    def waits_for_world(self, rt, rank: int, step: int, error: str, epoch: int) -> None:
        """A member's step broke on a vanished peer: it waits for the next world. (One of
        an older world than the current one broke because that world did: the current
        World is on its way to the rank, and the report says nothing about it.)"""
        with rt.cond:
            w = rt.worlds.world
            if w is None or epoch >= w.epoch:
                rt.worlds.waiting_world.add(rank)
        self.store.append_logs(rt.job.id, [f"rank {rank} abandoned step {step} and waits for "
                                           f"a new world: {error.splitlines()[0][:300]}"])

    def fall_back(self, rt, reason: str, step: int) -> None:
        """Re-planning cannot work: a fallback_restart event, then the attempt ends (once)."""
        with rt.cond:
            if rt.lost_sent or rt.fell_back:
                return
            rt.fell_back = True
            w = rt.worlds.world
            event = rt.worlds.fallback_event(reason, step)
        self.record(rt, Change(events=(event,)))
        self._lose(rt, None, f"fallback_restart: {reason} (world {w.epoch if w else '-'})")

    # ----------------------------------------------------------------- recording
    def record(self, rt, change: Change) -> None:
        """Persist and announce a membership change (outside the attempt's lock)."""
        job = rt.job
        if change.persist:
            self.persist(rt)
        for event in change.events:
            event = self.store.append_event(job.id, event)
            self.store.append_logs(job.id, [f"{event.kind}: ranks {list(event.ranks)} at step "
                                            f"{event.step}, world {event.epoch} of "
                                            f"{event.world_size} ranks: {event.reason}"])
            self._trace_event(job, event)
        if change.fallback:
            rt.fell_back = True
            self._lose(rt, None, f"fallback_restart: {change.fallback}")

    def persist(self, rt) -> None:
        """Store the membership as it is now. Writers take it one at a time: two calls
        recording at once must not leave the older snapshot in the store (a restarted
        controller would restore a world half formed, and the ranks reconnecting to it
        would disagree on its start). A writer that finds the store already holding the
        membership as it is (a concurrent writer stored its change) writes nothing: N ranks
        forming a world at once cost far fewer than N writes of O(N) bytes."""
        with rt.persist_lock:
            with rt.cond:
                record = {"attempt": rt.job.attempt,
                          "membership": rt.worlds.membership.snapshot(),
                          "history": {str(e): list(m) for e, m in rt.worlds.history.items()}}
            if record == rt.persisted:
                return
            self.store.set_world(rt.job.id, record)
            rt.persisted = record

    def _trace_event(self, job: JobRecord, event) -> None:
        parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                   else {})
        with self.tracer.start_as_current_span("job.world_change", context=parent) as span:
            span.set_attributes({
                "ringmaster.job_id": job.id, "ringmaster.attempt": job.attempt,
                "world.event": event.kind, "world.epoch": event.epoch,
                "world.size": event.world_size, "world.ranks": list(event.ranks),
                "world.step": event.step, "world.reason": event.reason})


def stalled(rt, now: float, timeout: float) -> tuple[str, list[int], str] | None:
    """("lose", ranks, why), ("stall", [rank], why): the rank whose progress stopped first
    among those computing, ("regroup", [], why) or None (see WorldKeeper.check)."""
    worlds = rt.worlds
    w = worlds.world
    if w is None:
        return None
    waiting = [s for s in worlds.membership.waiting() if s not in w.members]
    silent = [s for s in waiting if not rt.ranks[s].finished
              and now - rt.ranks[s].heard_at > timeout]
    if silent:
        return "lose", silent, f"replacement rank(s) {silent} went silent for {timeout:g} s"
    forming = not w.complete and (w.boundary is None or w.epoch in worlds.offered)
    if forming:  # members form it with collectives bounded by the process-group timeout,
        # twice the heartbeat timeout (workers.driver.group_config): give them as long
        if now - worlds.announced_at <= 2 * timeout:
            return None
        absent = [s for s in w.members if s not in w.formed and s not in worlds.waiting_world]
        if absent:
            return "lose", absent, (f"rank(s) {absent} did not form world {w.epoch} within "
                                    f"2 x heartbeat_timeout_s={timeout:g}")
        return "regroup", [], f"forming world {w.epoch} failed on every rank"
    if w.members and all(s in worlds.waiting_world for s in w.members):
        return "regroup", [], f"every rank of world {w.epoch} abandoned its step"
    gone = [s for s in w.members if not rt.ranks[s].finished
            and now - rt.ranks[s].heard_at > timeout]
    if gone:
        return "lose", gone, f"rank(s) {gone} went silent for {timeout:g} s (no heartbeat)"
    # Stalled: a rank that holds a plan it has not finished, is still computing it and whose
    # progress stopped. (Waiting for a plan, for a world to form, for a step boundary or in
    # the step's collectives or a ring transfer for the others is not stalling.)
    busy = [s for s in w.members if not rt.ranks[s].finished and s not in worlds.waiting_world
            and (w.complete or s not in w.joining) and not rt.ranks[s].syncing
            and rt.ranks[s].streamed_step > rt.ranks[s].done_step]
    late = [s for s in busy if now - rt.ranks[s].progress_at > timeout]
    if not late:
        return None
    first = min(late, key=lambda s: (rt.ranks[s].progress_at, s))
    idle = now - rt.ranks[first].progress_at
    return "stall", [first], (f"rank {first} made no progress for {idle:.1f} s "
                              f"(heartbeat_timeout_s={timeout:g}); presumed stalled")


__all__ = ["WORLD_WAKE_S", "WorldKeeper", "changed", "live_members", "lost_slots", "stalled"]
