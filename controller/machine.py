"""The job state machine: turns launcher events and stop requests into transitions.

`JobStateMachine.tick()` is one reconcile pass: apply the launcher's events, admit Pending
jobs whose gang fits (FIFO with backfill by default), start the next attempt of Restarting
jobs whose back-off has passed and whose gang fits again, and stop the workers of Stopping
jobs this machine has not stopped yet (a stop a standby replica accepted, or one a previous
leader did not finish). A job the launcher does not admit yet carries the launcher's
reason as its message (reason AwaitingAdmission, e.g. "waiting for Kueue admission in
queue X"). All state lives in the store (compare-and-set
transitions), so several passes, the REST API's stop requests and a restarted controller
can interleave without losing or repeating a transition. Policies are injected:
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

from opentelemetry import propagate, trace

from controller.launchers.base import EventKind, Launcher, LauncherEvent
from controller.states import JobRecord, StaleState, State
from controller.store import JobNotFound, JobStore

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
        used = max(job.attempt - 1, 0)
        limit = job.spec.failure.max_restarts
        if used >= limit:
            return RestartDecision(restart=False, reason="RestartLimitReached")
        return RestartDecision(restart=True,
                               delay_s=min(self.max_delay_s, self.base_delay_s * 2 ** used))


@dataclass(frozen=True, kw_only=True)
class FifoBackfill:
    """Oldest first; a job that does not fit does not block smaller ones behind it."""

    def order(self, pending: list[JobRecord]) -> list[JobRecord]:
        return sorted(pending, key=lambda j: (j.created_at, j.id))


class JobStateMachine:
    """Steps every active job; see the module docstring."""

    def __init__(self, *, store: JobStore, launcher: Launcher,
                 restart_policy: RestartPolicy | None = None,
                 admission: AdmissionPolicy | None = None,
                 clock: Callable[[], float] = time.time, tracer: trace.Tracer | None = None):
        self.store = store
        self.tracer = tracer or trace.get_tracer("controller.machine")
        self.launcher = launcher
        self.restart_policy = restart_policy or BoundedRestarts()
        self.admission = admission or FifoBackfill()
        self.clock = clock
        self._stops_sent: set[str] = set()  # Stopping jobs whose workers were told to stop

    def tick(self) -> None:
        """One reconcile pass."""
        for event in self.launcher.poll():
            self.handle(event)
        jobs = []
        for job_id in self.store.active_ids():
            try:
                jobs.append(self.store.get(job_id))
            except JobNotFound:
                continue
        waiting = {j.id for j in jobs if j.state is State.RESTARTING}
        for job in self.admission.order([j for j in jobs if j.state is State.PENDING]):
            if not self._admit(job, "Admitted"):
                waiting.add(job.id)
        now = self.clock()
        for job in jobs:
            if job.state is State.RESTARTING and now >= job.not_before:
                if self._admit(job, "Restarted"):
                    waiting.discard(job.id)
        self.launcher.retain_waiting(waiting)
        self._resend_stops(jobs)

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

    def _resend_stops(self, jobs: list[JobRecord]) -> None:
        stopping = {j.id for j in jobs if j.state is State.STOPPING}
        self._stops_sent &= stopping
        for job_id in sorted(stopping - self._stops_sent):
            self._stops_sent.add(job_id)
            self.launcher.stop(job_id)

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
                                        attempt=attempt, trace_parent=trace_parent)
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
            self._stops_sent.add(job.id)
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
            self._move(job, State.FAILED, "WorkersFailed", event.message)
        elif kind in (EventKind.WORKER_LOST, EventKind.STOPPED) and s in (State.SCHEDULING,
                                                                          State.RUNNING):
            self._attempt_lost(job, event)

    def _attempt_lost(self, job: JobRecord, event: LauncherEvent) -> None:
        where = f"rank {event.rank}: " if event.rank is not None else ""
        message = f"attempt {job.attempt}: {where}{event.message or 'worker lost'}"
        self.launcher.stop(job.id)  # tear the rest of the group down
        decision = self.restart_policy.decide(job, event)
        if decision.restart:
            self._move(job, State.RESTARTING, "WorkerLost", message,
                       not_before=self.clock() + decision.delay_s)
        else:
            self._move(job, State.FAILED, decision.reason or "WorkerLost", message)

    def _move(self, job: JobRecord, dst: State, reason: str, message: str = "",
              **updates) -> JobRecord | None:
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
            moved = self._move(job, dst, "StopRequested", "stop requested by a client",
                               stop_requested=True)
            if moved is not None:
                if dst is State.STOPPING:
                    self._stops_sent.add(job_id)
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
        while not self._stop.is_set():
            try:
                self.machine.tick()
            except Exception:  # Redis briefly away, a launcher hiccup: log, retry next pass
                log.exception("reconcile pass failed; retrying")
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
