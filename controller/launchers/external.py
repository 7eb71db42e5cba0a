"""External launcher: the controller plans and watches, someone else starts the ranks.

For clusters whose processes are started by another system (`srun`, an MPI launcher, a
hand-written script) and for the control-plane benchmark (bench/control_plane.py, whose
simulated ranks speak the real gRPC protocol). `start(job, attempt)` starts nothing: it
writes the attempt's worker environment to `<state_dir>/external/<job>-<attempt>.env`
(mode 0600 in a 0700 directory; `KEY=value` lines) and the ranks are expected to call
back with it:

    RINGMASTER_JOB_ID, RINGMASTER_ATTEMPT   who the ranks are (the attempt is the fence)
    RINGMASTER_CONTROLLER                   the gRPC address to dial
    RINGMASTER_WORKER_SECRET                the attempt's secret (controller.worker_auth)
    RINGMASTER_NUM_RANKS                    how many ranks the attempt has

The gRPC service reports READY (every rank registered) and WORKER_LOST (a rank failed or
stopped making progress); since no process of ours exits when the job is done, the
service also reports COMPLETED once every rank has reported the last step
(`completes_from_reports`). `stop` reports STOPPED at once: the ranks learn of the stop
from their heartbeat replies and plan stream, and nothing here can kill them. The env
file of an attempt is removed when the attempt ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from controller.launchers.base import EventKind, Launcher, LauncherEvent
from controller.states import JobRecord


class ExternalLauncher(Launcher):
    """See the module docstring."""

    name = "external"
    completes_from_reports = True  # the gRPC service reports COMPLETED after the last step

    def __init__(self, *, state_dir: str | Path, controller_address: str,
                 worker_secret: Callable[[str, int], str], total_ranks: int | None = None,
                 controller_ca: str | None = None):
        if total_ranks is not None and total_ranks < 1:
            raise ValueError(f"total_ranks={total_ranks} must be >= 1 (or None: no limit)")
        self.dir = Path(state_dir) / "external"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.controller_address = controller_address
        self.worker_secret = worker_secret
        self.total_ranks = total_ranks
        self.controller_ca = controller_ca
        self._attempts: dict[str, tuple[int, int]] = {}  # job id -> (attempt, ranks)
        self._events: list[LauncherEvent] = []
        self._lock = threading.Lock()

    def env_path(self, job_id: str, attempt: int) -> Path:
        """Where the worker environment of that attempt is written."""
        return self.dir / f"{job_id}-{attempt}.env"

    def admit(self, job: JobRecord) -> bool:
        if self.total_ranks is None:
            return True
        with self._lock:
            held = sum(n for jid, (_, n) in self._attempts.items() if jid != job.id)
        return job.spec.resources.num_ranks <= self.total_ranks - held

    def start(self, job: JobRecord, attempt: int) -> None:
        env = {"RINGMASTER_JOB_ID": job.id, "RINGMASTER_ATTEMPT": str(attempt),
               "RINGMASTER_CONTROLLER": self.controller_address,
               "RINGMASTER_WORKER_SECRET": self.worker_secret(job.id, attempt),
               "RINGMASTER_NUM_RANKS": str(job.spec.resources.num_ranks)}
        if self.controller_ca:
            env["RINGMASTER_CONTROLLER_CA"] = self.controller_ca
        path = self.env_path(job.id, attempt)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in env.items()))
        with self._lock:
            old = self._attempts.get(job.id)
            self._attempts[job.id] = (attempt, job.spec.resources.num_ranks)
        if old is not None and old[0] != attempt:
            self.env_path(job.id, old[0]).unlink(missing_ok=True)

    def stop(self, job_id: str) -> None:
        with self._lock:
            attempt, _ = self._attempts.pop(job_id, (0, 0))
            self._events.append(LauncherEvent(job_id=job_id, attempt=attempt,
                                              kind=EventKind.STOPPED))
        if attempt:
            self.env_path(job_id, attempt).unlink(missing_ok=True)

    def report(self, event: LauncherEvent) -> None:
        """Queue an event the gRPC service observed; an ending attempt frees its ranks."""
        with self._lock:
            held = self._attempts.get(event.job_id)
            ends = event.kind is not EventKind.READY and held and held[0] == event.attempt
            if ends:
                del self._attempts[event.job_id]
            self._events.append(event)
        if ends:
            self.env_path(event.job_id, event.attempt).unlink(missing_ok=True)

    def poll(self) -> list[LauncherEvent]:
        with self._lock:
            events, self._events = self._events, []
            return events

    def tracks(self, job_id: str, attempt: int) -> bool:
        with self._lock:
            held = self._attempts.get(job_id)
        return held is not None and held[0] == attempt


__all__ = ["ExternalLauncher"]
