"""The launcher interface: how the job state machine starts and stops a job's workers.

A launcher owns no job state; the state machine (controller.machine) decides, the launcher
acts and reports. Four calls, all non-blocking and safe to repeat:

- `admit(job)`: the gang check. True when every rank of the job can start now (all or
  nothing); False leaves the job Pending and it is asked again on the next tick.
- `start(job, attempt)`: start the worker group of that attempt (one worker per rank). The
  attempt number travels to the workers, which present it on every report (fencing).
- `stop(job_id)`: tear the job's workers down, whatever attempt they run. Idempotent.
- `poll()`: events since the last poll: a group became ready, a worker was lost, the job's
  workers finished (successfully or not), or the workers of a stopped job are gone.
- `tracks(job_id, attempt)` (optional): whether the launcher has a record of that attempt,
  so a restarted controller can re-drive an attempt it admitted but never started. None
  (the default) means "cannot tell"; the state machine's timeouts cover that case.

Each attempt's workers present a secret (`worker_secret`, see controller.worker_auth) on
every gRPC call; a launcher hands it to them out of band (an environment variable, a
Kubernetes Secret), never on a command line.

Optional calls with defaults: `admission_message(job)` says why `admit` said no (the job
shows it while it waits, e.g. "waiting for Kueue admission in queue X"); `check_spec(spec)`
refuses at submit a spec this launcher cannot run (SpecError, a 422); `retain_waiting(ids)`
lets a launcher that prepares something in `admit` (a Kueue-queued cluster) release it once
its job no longer waits.

Implementations: `FakeLauncher` (in memory, for tests and dry runs), the Ray launcher,
the Kubernetes launcher (KubeRay RayCluster per job) and `StandbyLauncher` (what a
controller replica that is not the leader holds). Config selects one by name
(`launcher: ray|kuberay|fake`); see controller.launchers.make_launcher.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

from controller.edge import FieldError
from controller.spec import JobCreate
from controller.states import JobRecord
from scheduler.errors import SpecError


class EventKind(StrEnum):
    READY = "Ready"              # every rank of the attempt is up
    WORKER_LOST = "WorkerLost"   # a rank died or stopped heartbeating
    COMPLETED = "Completed"      # the workers finished all training steps
    FAILED = "Failed"            # the workers exited with an error that a restart won't fix
    STOPPED = "Stopped"          # after stop(): every worker of the job is gone


@dataclass(frozen=True, kw_only=True)
class LauncherEvent:
    """Something a launcher observed about one attempt of one job."""

    job_id: str
    attempt: int  # the attempt the event is about; stale attempts are ignored
    kind: EventKind
    rank: int | None = None  # the rank concerned, when one is
    message: str = ""  # human-readable detail (exit code, pod event, ...), one line
    reason: str = ""  # the transition's reason when it says more than the kind (FAILED:
    # InvalidInput, a user error no retry can fix; default WorkersFailed)


class Launcher(ABC):
    """Starts and stops job worker groups; see the module docstring for the contract."""

    name: str = "abstract"

    @abstractmethod
    def admit(self, job: JobRecord) -> bool:
        """True when all `job.spec.resources.num_ranks` ranks can start now (gang)."""

    @abstractmethod
    def start(self, job: JobRecord, attempt: int) -> None:
        """Start the worker group of `attempt` (non-blocking; READY comes through poll)."""

    @abstractmethod
    def stop(self, job_id: str) -> None:
        """Tear down every worker of the job (non-blocking; STOPPED comes through poll)."""

    @abstractmethod
    def poll(self) -> list[LauncherEvent]:
        """Events observed since the previous call, oldest first."""

    def tracks(self, job_id: str, attempt: int) -> bool | None:
        """True/False: the launcher has/has not a record of this attempt; None: unknown."""
        return None

    def close(self) -> None:
        """Release the launcher's own resources (not the jobs' workers, which outlive it)."""
        return None

    def admission_message(self, job: JobRecord) -> str:
        """Why the last `admit(job)` said no, for the job's message ('' : nothing to say)."""
        return ""

    def check_spec(self, spec: JobCreate) -> None:
        """Raise SpecError if this launcher cannot run `spec` (called at submit)."""
        reject_kubernetes_section(spec, self.name)

    def retain_waiting(self, job_ids: set[str]) -> None:
        """After each admission pass: the jobs that still wait to be admitted. What the
        launcher prepared during `admit` for any other job not started since (a queued
        cluster of a job stopped on another replica) may be released."""
        return None


def drain_events(events: queue.SimpleQueue) -> list[LauncherEvent]:
    """Everything queued on `events` so far, oldest first, without waiting. Launchers
    queue what `report()` hands them on such a queue: it takes no lock, so the gRPC
    service's threads never wait for a launcher call that is talking to an API server."""
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


def reject_kubernetes_section(spec: JobCreate, launcher: str) -> None:
    """resources.kubernetes only means something to the kuberay launcher: refuse it
    elsewhere rather than ignore it."""
    if spec.resources.kubernetes is not None:
        raise SpecError(f"resources.kubernetes: this controller runs the {launcher} launcher; "
                        "the section applies only to the kuberay launcher (remove it)")


class StandbyLauncher(Launcher):
    """What a controller replica holds while another replica is the leader.

    It admits and starts nothing (a standby's state machine does not run), and leaves
    `stop` to the leader: a stop request a standby accepts moves the job to Stopping in the
    store, and the leader's next pass stops every Stopping job's workers. Submitted specs
    are still checked, by `check` (the launcher the leader runs decides what is valid).
    """

    name = "standby"

    def __init__(self, *, check=None):
        self._check = check

    def admit(self, job: JobRecord) -> bool:
        return False

    def start(self, job: JobRecord, attempt: int) -> None:
        raise RuntimeError(f"job {job.id}: this replica is not the leader; it starts nothing")

    def stop(self, job_id: str) -> None:
        return None  # the leader stops Stopping jobs on its next pass

    def poll(self) -> list[LauncherEvent]:
        return []

    def check_spec(self, spec: JobCreate) -> None:
        if self._check is not None:
            self._check(spec)


@dataclass(frozen=True, kw_only=True)
class FakeGroup:
    """What FakeLauncher remembers of a started attempt."""

    job_id: str
    attempt: int
    num_ranks: int


class FakeLauncher(Launcher):
    """In-memory launcher with a fixed number of free ranks; tests script its events.

    `start` reserves the ranks; READY is reported on the next poll when `auto_ready`.
    `stop` frees them and reports STOPPED. Tests inject failures with `lose_worker`,
    `complete`, `fail`, or any event with `push`. Thread-safe.
    """

    name = "fake"

    def __init__(self, *, total_ranks: int = 1 << 20, auto_ready: bool = True):
        if total_ranks < 1:
            raise ValueError(f"total_ranks={total_ranks} must be >= 1")
        self.total_ranks = total_ranks
        self.auto_ready = auto_ready
        self.groups: dict[str, FakeGroup] = {}
        self.started: list[tuple[str, int]] = []  # (job_id, attempt), in call order
        self.stopped: list[str] = []
        self._events: list[LauncherEvent] = []
        self._lock = threading.Lock()

    @property
    def free_ranks(self) -> int:
        return self.total_ranks - sum(g.num_ranks for g in self.groups.values())

    def admit(self, job: JobRecord) -> bool:
        with self._lock:
            return job.spec.resources.num_ranks <= self.free_ranks

    def start(self, job: JobRecord, attempt: int) -> None:
        with self._lock:
            n = job.spec.resources.num_ranks
            held = self.groups.pop(job.id, None)
            if n > self.free_ranks:
                if held:
                    self.groups[job.id] = held
                raise RuntimeError(f"job {job.id}: {n} ranks requested, {self.free_ranks} free")
            self.groups[job.id] = FakeGroup(job_id=job.id, attempt=attempt, num_ranks=n)
            self.started.append((job.id, attempt))
            if self.auto_ready:
                self._events.append(LauncherEvent(job_id=job.id, attempt=attempt,
                                                  kind=EventKind.READY))

    def stop(self, job_id: str) -> None:
        with self._lock:
            group = self.groups.pop(job_id, None)
            self.stopped.append(job_id)
            attempt = group.attempt if group else 0
            self._events.append(LauncherEvent(job_id=job_id, attempt=attempt,
                                              kind=EventKind.STOPPED))

    def poll(self) -> list[LauncherEvent]:
        with self._lock:
            events, self._events = self._events, []
            return events

    def check_spec(self, spec: JobCreate) -> None:
        """Only its capacity: it runs nothing, so it can stand in for any launcher."""
        if spec.resources.num_ranks > self.total_ranks:
            raise FieldError("resources.num_ranks", f"{spec.resources.num_ranks}: this controller "
                            f"runs at most {self.total_ranks} ranks at once; it would wait "
                            "forever")

    def admission_message(self, job: JobRecord) -> str:
        with self._lock:
            used = self.total_ranks - self.free_ranks
        return (f"waiting for {job.spec.resources.num_ranks} free ranks: {used} of "
                f"{self.total_ranks} are in use")

    def tracks(self, job_id: str, attempt: int) -> bool:
        with self._lock:
            group = self.groups.get(job_id)
            return group is not None and group.attempt == attempt

    def push(self, event: LauncherEvent) -> None:
        """Queue any event for the next poll (frees the ranks of an ending attempt)."""
        with self._lock:
            if event.kind is not EventKind.READY:
                group = self.groups.get(event.job_id)
                if group and group.attempt == event.attempt:
                    del self.groups[event.job_id]
            self._events.append(event)

    def _current(self, job_id: str) -> int:
        group = self.groups.get(job_id)
        if group is None:
            raise KeyError(f"job {job_id} has no running group in the fake launcher")
        return group.attempt

    def ready(self, job_id: str) -> None:
        self.push(LauncherEvent(job_id=job_id, attempt=self._current(job_id),
                                kind=EventKind.READY))

    def lose_worker(self, job_id: str, rank: int = 0, message: str = "worker died") -> None:
        self.push(LauncherEvent(job_id=job_id, attempt=self._current(job_id),
                                kind=EventKind.WORKER_LOST, rank=rank, message=message))

    def complete(self, job_id: str) -> None:
        self.push(LauncherEvent(job_id=job_id, attempt=self._current(job_id),
                                kind=EventKind.COMPLETED))

    def fail(self, job_id: str, message: str = "worker exited with an error") -> None:
        self.push(LauncherEvent(job_id=job_id, attempt=self._current(job_id),
                                kind=EventKind.FAILED, message=message))
