"""The job state machine: turns launcher events and stop requests into transitions.

`JobStateMachine.tick()` is one reconcile pass: apply the launcher's events, admit Pending
jobs whose gang fits (FIFO with backfill by default), and act on the jobs whose due time
has come: start the next attempt of a Restarting job whose back-off has passed and whose
gang fits again, end an attempt that stayed Scheduling past `Timeouts.scheduling_s`, stop
the workers of a Stopping job this machine has not stopped yet (a stop a standby replica
accepted, or one a previous leader did not finish) and stop them again each
`Timeouts.stopping_s` (ending the job Stopped/StopTimedOut after `stop_attempts`). A pass
reads only the store's pending and due indexes, never every active job: a Running job
costs nothing until its launcher reports an event. A job the launcher does not admit yet
carries the launcher's reason as its message (reason AwaitingAdmission, e.g. "waiting for
Kueue admission in queue X").

`recover()` runs when a reconciler starts (a controller start, or a replica taking the
lead): it rebuilds those indexes from the active jobs and re-drives what a killed
controller left half-done: a Scheduling attempt its launcher has no record of starts
again as a new attempt (reason `Redriven`; this does not use the job's restart budget,
and any workers of the old attempt are fenced off), and Stopping jobs are stopped again.

All state lives in the store (compare-and-set transitions), so several passes, the REST
API's stop requests and a restarted controller can interleave without losing or
repeating a transition. Policies are injected:
`RestartPolicy` decides restart-or-fail when an attempt ends abnormally, `AdmissionPolicy`
orders the Pending queue. Events of an attempt other than the job's current one are
dropped (fencing); terminal jobs never move again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
from opentelemetry import propagate, trace

from controller.launchers.base import EventKind, Launcher, LauncherEvent
from controller.states import JobRecord, StaleState, State
from controller.store import JobNotFound, JobStore
from scheduler.errors import SpecError

log = logging.getLogger(__name__)

AWAITING_ADMISSION = "AwaitingAdmission"  # reason of a job the launcher does not admit yet


@dataclass(frozen=True, kw_only=True)
class RestartDecision:
    restart: bool
    delay_s: float = 0.0  # back-off before the next attempt starts
    reason: str = ""  # the transition's reason when the job fails instead


class RestartPolicy(Protocol):
    def decide(self, job: JobRecord, event: LauncherEvent) -> RestartDecision: ...


class AdmissionPolicy(Protocol):
    def order(self, pending: list[JobRecord]) -> list[JobRecord]: ...


@dataclass(frozen=True, kw_only=True)
class BoundedRestarts:
    """Restart up to the job's failure.max_restarts, with exponential back-off."""

    base_delay_s: float = 1.0  # delay before the first restart
    max_delay_s: float = 60.0  # cap of the doubling delay

    def decide(self, job: JobRecord, event: LauncherEvent) -> RestartDecision:
        used = max(job.attempt - 1 - job.redrives, 0)
        limit = job.spec.failure.max_restarts
        if used >= limit:
            return RestartDecision(restart=False, reason="RestartLimitReached")
        return RestartDecision(restart=True,
                               delay_s=min(self.max_delay_s, self.base_delay_s * 2 ** used))


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """How long a job may stay in a state that waits on its workers."""

    scheduling_s: float = 1800.0  # an attempt not Running by then is lost (WorkerLost)
    stopping_s: float = 300.0  # the stop is issued again each time this passes ...
    stop_attempts: int = 3  # ... and after this many the job ends Stopped (StopTimedOut)

    def __post_init__(self) -> None:
        if self.scheduling_s <= 0 or self.stopping_s <= 0 or self.stop_attempts < 1:
            raise SpecError(f"timeouts {self} must be positive (stop_attempts >= 1)")


@dataclass(frozen=True, kw_only=True)
class FifoBackfill:
    """Oldest first; a job that does not fit does not block smaller ones behind it."""

    def order(self, pending: list[JobRecord]) -> list[JobRecord]:
        return sorted(pending, key=lambda j: (j.created_at, j.id))


def with_logs_pointer(message: str, job_id: str) -> str:
    """A failure's message: one line, then where the whole story is."""
    flat = " ".join(message.split())
    return f"{flat} (logs: ringmaster logs {job_id})"


class JobStateMachine:
    """Steps every active job; see the module docstring."""

    def __init__(self, *, store: JobStore, launcher: Launcher,
                 restart_policy: RestartPolicy | None = None,
                 admission: AdmissionPolicy | None = None, timeouts: Timeouts | None = None,
                 clock: Callable[[], float] = time.time, tracer: trace.Tracer | None = None):
        self.store = store
        self.timeouts = timeouts or Timeouts()
        self.tracer = tracer or trace.get_tracer("controller.machine")
        self.launcher = launcher
        self.restart_policy = restart_policy or BoundedRestarts()
        self.admission = admission or FifoBackfill()
        self.clock = clock
        # Stopping jobs whose workers this machine told to stop -> in which stopping_s round
        self._stops_sent: dict[str, int] = {}

    def tick(self) -> None:
        """One reconcile pass (see the module docstring)."""
        for event in self.launcher.poll():
            self.handle(event)
        pending = [j for j in self._records(self.store.pending_ids())
                   if j.state is State.PENDING]
        waiting = {j.id for j in pending}
        for job in self.admission.order(pending):
            if self._admit(job, "Admitted"):
                waiting.discard(job.id)
        now = self.clock()
        due = self._records(self.store.due_ids(now))
        for job in due:
            self._due(job, now)
        # Every job in the due index may still wait (Restarting ones until their back-off
        # ends); a launcher releases only what no waiting job holds.
        self.launcher.retain_waiting(waiting | set(self.store.due_ids(float("inf"),
                                                                      limit=100_000)))

    def _records(self, job_ids: list[str]) -> list[JobRecord]:
        out = []
        for job_id in job_ids:
            try:
                out.append(self.store.get(job_id))
            except JobNotFound:
                self.store.set_due(job_id, None)
        return out

    def _due(self, job: JobRecord, now: float) -> None:
        since = job.state_since or job.updated_at
        t = self.timeouts
        if job.state is State.RESTARTING:
            if now >= job.not_before:
                self._admit(job, "Restarted")  # not admitted: stays due, asked again
            else:
                self.store.set_due(job.id, job.not_before)
        elif job.state is State.SCHEDULING and now - since >= t.scheduling_s:
            self.handle(LauncherEvent(
                job_id=job.id, attempt=job.attempt, kind=EventKind.WORKER_LOST,
                message=f"not running after {t.scheduling_s:g} s (scheduling timeout)"))
        elif job.state is State.SCHEDULING:
            self.store.set_due(job.id, since + t.scheduling_s)
        elif job.state is State.STOPPING:
            self._stopping_due(job, max(now - since, 0.0))
        else:  # Running, or it moved on since it was indexed: nothing is due
            self.store.set_due(job.id, None)

    def _stopping_due(self, job: JobRecord, waited_s: float) -> None:
        t = self.timeouts
        if waited_s >= t.stopping_s * t.stop_attempts:
            self._stops_sent.pop(job.id, None)
            self._move(job, State.STOPPED, "StopTimedOut",
                       f"the workers did not confirm they stopped within {waited_s:.0f} s; "
                       "some may still be running")
            return
        rounds = int(waited_s // t.stopping_s)
        if self._stops_sent.get(job.id) != rounds:
            if rounds:
                log.warning("job %s still Stopping after %.0f s; stopping it again", job.id,
                            waited_s)
            self._stops_sent[job.id] = rounds
            self.launcher.stop(job.id)
        self.store.set_due(job.id, (job.state_since or job.updated_at)
                           + (rounds + 1) * t.stopping_s)

    def recover(self) -> None:
        """When a reconciler starts: rebuild the indexes and re-drive half-done work."""
        self._stops_sent.clear()  # a new launcher (restart, new leader) knows of no stop
        now = self.clock()
        for job_id in self.store.active_ids():
            try:
                job = self.store.get(job_id)
            except JobNotFound:
                continue
            since = job.state_since or job.updated_at
            if job.state is State.PENDING:
                self.store.index_pending(job.id)
            elif job.state is State.RESTARTING:
                self.store.set_due(job.id, job.not_before)
            elif job.state is State.SCHEDULING and \
                    self.launcher.tracks(job.id, job.attempt) is False:
                self._redrive(job)
            elif job.state is State.SCHEDULING:
                self.store.set_due(job.id, since + self.timeouts.scheduling_s)
            elif job.state is State.STOPPING:
                self.store.set_due(job.id, now)  # the next pass stops its workers

    def _redrive(self, job: JobRecord) -> None:
        message = (f"attempt {job.attempt} was never started (the controller stopped while "
                   "scheduling it); starting it again")
        log.warning("job %s: %s", job.id, message)
        now = self.clock()
        moved = self._move(job, State.RESTARTING, "Redriven", message, not_before=now,
                           redrives=job.redrives + 1, due_at=now)
        if moved is not None:
            self._admit(moved, "Redriven")

    def _admit(self, job: JobRecord, reason: str) -> bool:
        if self.launcher.admit(job):
            self._start_attempt(job, reason)
            return True
        self._note_waiting(job)
        return False

    def _note_waiting(self, job: JobRecord) -> None:
        message = self.launcher.admission_message(job)
        if message and (job.reason, job.message) != (AWAITING_ADMISSION, message):
            try:
                self.store.note(job.id, state=job.state, reason=AWAITING_ADMISSION,
                                message=message)
            except (StaleState, JobNotFound):
                pass  # it moved on meanwhile; the next pass sees the truth

    def _start_attempt(self, job: JobRecord, reason: str) -> None:
        # One job.schedule span per attempt, in the trace the submission started (each
        # attempt under the previous one); its context goes to the workers with every plan.
        parent = propagate.extract({"traceparent": job.trace_parent} if job.trace_parent
                                   else {})
        with self.tracer.start_as_current_span("job.schedule", context=parent) as span:
            span.set_attributes({"job.id": job.id, "job.attempt": job.attempt + 1,
                                 "job.reason": reason,
                                 "job.num_ranks": job.spec.resources.num_ranks})
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            self._launch(job, reason, carrier.get("traceparent", job.trace_parent))

    def _launch(self, job: JobRecord, reason: str, trace_parent: str) -> None:
        attempt = job.attempt + 1
        try:
            job = self.store.transition(job.id, src=job.state, dst=State.SCHEDULING,
                                        reason=reason, message=f"attempt {attempt}",
                                        attempt=attempt, trace_parent=trace_parent,
                                        due_at=self.clock() + self.timeouts.scheduling_s)
        except (StaleState, JobNotFound):
            return  # someone else moved it (a stop request); the next pass sees the truth
        try:
            self.launcher.start(job, attempt)
        except Exception as exc:  # a launcher's API failing is an attempt failure, not ours
            log.warning("job %s attempt %d failed to start: %s", job.id, attempt, exc)
            self.handle(LauncherEvent(job_id=job.id, attempt=attempt,
                                      kind=EventKind.WORKER_LOST,
                                      message=f"start failed: {exc}"))
            return
        if self.store.get(job.id).state is State.STOPPING:
            self._stops_sent[job.id] = 0
            self.launcher.stop(job.id)  # a stop raced with the start: stop what started

    def handle(self, event: LauncherEvent) -> None:
        """Apply one launcher event (stale or unknown ones are dropped)."""
        try:
            job = self.store.get(event.job_id)
        except JobNotFound:
            return
        if job.state.terminal:
            return
        if event.kind is EventKind.STOPPED and job.state is State.STOPPING:
            self._move(job, State.STOPPED, "StopRequested", "workers stopped")
            return
        if event.attempt != job.attempt:
            log.info("job %s: dropped %s of attempt %d (current %d)", job.id, event.kind,
                     event.attempt, job.attempt)
            return
        self._apply(job, event)

    def _apply(self, job: JobRecord, event: LauncherEvent) -> None:
        s, kind = job.state, event.kind
        if kind is EventKind.READY and s is State.SCHEDULING:
            self._move(job, State.RUNNING, "WorkersReady", event.message)
        elif kind is EventKind.COMPLETED and s in (State.SCHEDULING, State.RUNNING,
                                                   State.STOPPING):
            self._move(job, State.SUCCEEDED, "Completed", event.message)
        elif kind is EventKind.FAILED and s in (State.SCHEDULING, State.RUNNING, State.STOPPING):
            self.launcher.stop(job.id)  # whatever of the group still runs
            self._move(job, State.FAILED, event.reason or "WorkersFailed",
                       with_logs_pointer(event.message or "the workers failed", job.id))
        elif kind in (EventKind.WORKER_LOST, EventKind.STOPPED) and s in (State.SCHEDULING,
                                                                          State.RUNNING):
            self._attempt_lost(job, event)

    def _attempt_lost(self, job: JobRecord, event: LauncherEvent) -> None:
        detail = event.message or "worker lost"
        named = event.rank is None or detail.startswith(f"rank {event.rank}")
        where = "" if named else f"rank {event.rank}: "
        message = with_logs_pointer(f"attempt {job.attempt}: {where}{detail}", job.id)
        self.launcher.stop(job.id)  # tear the rest of the group down
        decision = self.restart_policy.decide(job, event)
        if decision.restart:
            not_before = self.clock() + decision.delay_s
            self._move(job, State.RESTARTING, "WorkerLost", message, not_before=not_before,
                       due_at=not_before)
        else:
            self._move(job, State.FAILED, decision.reason or "WorkerLost", message)

    def _move(self, job: JobRecord, dst: State, reason: str, message: str = "",
              **updates) -> JobRecord | None:
        if dst.terminal:
            self._stops_sent.pop(job.id, None)
        try:
            return self.store.transition(job.id, src=job.state, dst=dst, reason=reason,
                                         message=message, **updates)
        except (StaleState, JobNotFound):
            return None

    def request_stop(self, job_id: str) -> JobRecord:
        """Stop a job: Pending/Restarting stop at once, running workers drain first.

        Raises JobNotFound, or StaleState when the job has already finished.
        """
        for _ in range(5):
            job = self.store.get(job_id)
            if job.state.terminal:
                raise StaleState(f"job {job_id} already finished ({job.state.value}); "
                                 "nothing to stop")
            if job.state is State.STOPPING:
                return job
            dst = State.STOPPED if job.state in (State.PENDING, State.RESTARTING) \
                else State.STOPPING
            # Due at once: the leader's next pass confirms the stop (a standby replica,
            # whose launcher stops nothing, may be the one answering this request).
            moved = self._move(job, dst, "StopRequested", "stop requested by a client",
                               stop_requested=True,
                               due_at=self.clock() if dst is State.STOPPING else None)
            if moved is not None:
                if dst is State.STOPPING:
                    self._stops_sent[job_id] = 0
                # A Pending job may hold a queued (Kueue-suspended) cluster, a Restarting
                # one the remains of its last attempt: stop them too.
                self.launcher.stop(job_id)
                return moved
        raise StaleState(f"job {job_id} kept changing state; retry the stop")


class Reconciler:
    """Runs `machine.tick()` every `interval_s` on a daemon thread until `close()`."""

    def __init__(self, machine: JobStateMachine, *, interval_s: float = 0.5):
        self.machine = machine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> Reconciler:
        self._thread.start()
        return self

    def _run(self) -> None:
        recovered, failing_since = False, None
        while not self._stop.is_set():
            try:
                if not recovered:
                    self.machine.recover()
                    recovered = True
                self.machine.tick()
                if failing_since is not None:
                    log.info("reconciler recovered after %.0f s",
                             time.monotonic() - failing_since)
                    failing_since = None
            except redis.RedisError as exc:  # the store is away: one line, not a traceback
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("reconcile pass failed: job store unavailable (%s); "
                                "retrying every %.1f s", exc, self.interval_s)
            except Exception:  # a launcher hiccup, or a bug: log it, retry next pass
                log.exception("reconcile pass failed; retrying")
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
