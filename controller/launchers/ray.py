"""Ray launcher: each attempt of a job is one detached driver process on Ray.

`start(job, attempt)` spawns `python -m workers.driver --job ID --attempt A --controller
ADDR` in a session of its own. The driver joins Ray (`RAY_ADDRESS`, or a local Ray it
starts with `ray.init()`), creates one actor per rank and calls back over gRPC. Because
the driver is not a child that dies with us, workers outlive a controller restart: the
launcher remembers every driver in `<state_dir>/ray/<job>.json` and finds them again.

What the launcher sees itself (process exits) it reports through `poll()`; what the gRPC
service sees (all ranks registered, a rank lost or stalled) it reports with `report()`.
Exit protocol of the driver: 0 = all steps done (COMPLETED), 3 = an error a restart will
not fix (FAILED, with the exit file's `reason`, e.g. InvalidInput), anything else or a
missing exit file = WORKER_LOST. The driver's output
goes to `<state_dir>/ray/<job>-<attempt>.log`; `poll()` forwards new lines to `on_logs`.
That directory is private (0700, files 0600): logs and records are the jobs' own.

Concurrency: `report()` is called from the gRPC service's threads and only enqueues (a
lock-free queue), so a rank's RPC never waits for the state machine's thread. That thread
makes every other call; `self._lock` guards the driver table for the readers (`admit`,
`tracks`, `admission_message`) and is never held across a kill, a process start, a file
or the `on_logs` callback.

Capacity: at most `total_ranks` ranks run at once (gang admission): the constructor's
figure (`ringmaster serve --max-ranks`), else $RINGMASTER_MAX_RANKS, else one rank per CPU
this process may use (its affinity mask, capped by a cgroup CPU quota). A job larger than
that is refused at submit (`check_spec`); a job that waits says for how many ranks and
which jobs hold the rest (`admission_message`). With RAY_ADDRESS (a Ray cluster) set the
limit to the cluster's size: the launcher does not ask Ray.

The attempt's worker secret (`worker_secret(job_id, attempt)`, controller.worker_auth)
reaches the driver in its environment, `RINGMASTER_WORKER_SECRET`, which the driver
forwards to every rank; with `controller_ca` the driver and ranks speak TLS to the
controller and trust that CA (`RINGMASTER_CONTROLLER_CA`). Neither is ever a command-line
argument.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from controller.edge import FieldError
from controller.launchers.base import EventKind, Launcher, LauncherEvent, drain_events
from controller.spec import JobCreate
from controller.states import JobRecord
from scheduler.driver_exit import EXIT_FAILED, EXIT_OK

WORKER_SECRET_ENV = "RINGMASTER_WORKER_SECRET"
MAX_RANKS_ENV = "RINGMASTER_MAX_RANKS"
CONTROLLER_CA_ENV = "RINGMASTER_CONTROLLER_CA"
_LOG_CHUNK = 256 * 1024  # bytes of driver output forwarded per poll and job


@dataclass(kw_only=True)
class DriverRecord:
    """A started driver, as persisted in the state directory."""

    job_id: str
    attempt: int
    pid: int
    num_ranks: int
    log_path: str
    exit_path: str
    stopping: bool = False
    kill_at: float = 0.0  # unix seconds after which a stopping driver is killed
    log_offset: int = 0


def max_ranks_from_env() -> int | None:
    """$RINGMASTER_MAX_RANKS as a positive integer (None when unset); ValueError otherwise."""
    raw = os.environ.get(MAX_RANKS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_RANKS_ENV}={raw!r} must be a positive integer (ranks the "
                         "local launcher runs at once)")
    return int(raw)


def local_cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's `--cpus`); one rank per CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RayLauncher(Launcher):
    """Runs job attempts as detached Ray driver processes (see the module docstring)."""

    name = "ray"

    def __init__(self, *, state_dir: str | Path, controller_address: str,
                 total_ranks: int | None = None, ray_address: str | None = None,
                 python: str = sys.executable, extra_env: dict[str, str] | None = None,
                 on_logs: Callable[[str, list[str]], None] | None = None,
                 drain_timeout_s: float = 60.0,
                 worker_secret: Callable[[str, int], str] | None = None,
                 controller_ca: str | None = None):
        self.dir = Path(state_dir) / "ray"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        self.worker_secret = worker_secret
        self.controller_ca = controller_ca
        self.controller_address = controller_address
        from_env = max_ranks_from_env()
        self.total_ranks = total_ranks or from_env or local_cpu_count()
        self._capacity_source = ("set by the controller's configuration" if total_ranks else
                                 f"{MAX_RANKS_ENV}" if from_env else
                                 "one rank per CPU of this machine")
        self.ray_address = ray_address if ray_address is not None else \
            os.environ.get("RAY_ADDRESS")
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.on_logs = on_logs
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()  # the driver table; never held across I/O
        self._events: queue.SimpleQueue[LauncherEvent] = queue.SimpleQueue()
        self._children: dict[int, subprocess.Popen] = {}
        self._drivers: dict[str, DriverRecord] = self._load()

    # persistence ---------------------------------------------------------------------------
    def _record_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _save(self, rec: DriverRecord) -> None:
        tmp = self._record_path(rec.job_id).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(asdict(rec)))
        tmp.replace(self._record_path(rec.job_id))

    def _load(self) -> dict[str, DriverRecord]:
        out = {}
        for path in self.dir.glob("*.json"):
            try:
                rec = DriverRecord(**json.loads(path.read_text()))
            except (json.JSONDecodeError, TypeError):
                continue
            out[rec.job_id] = rec
        return out

    # Launcher -------------------------------------------------------------------------------
    def admit(self, job: JobRecord) -> bool:
        with self._lock:
            used = sum(d.num_ranks for d in self._drivers.values() if d.job_id != job.id)
            return job.spec.resources.num_ranks <= self.total_ranks - used

    def check_spec(self, spec: JobCreate) -> None:
        super().check_spec(spec)
        n = spec.resources.num_ranks
        if n > self.total_ranks:
            raise FieldError("resources.num_ranks", f"{n}: this controller runs at most "
                            f"{self.total_ranks} ranks at once ({self._capacity_source}); "
                            f"it would wait forever. Ask for at most {self.total_ranks}, or "
                            f"raise the limit with {MAX_RANKS_ENV} / `ringmaster serve "
                            "--max-ranks` where the machine (or Ray cluster) has room")

    def admission_message(self, job: JobRecord) -> str:
        with self._lock:
            others = sorted((d.job_id, d.num_ranks) for d in self._drivers.values()
                            if d.job_id != job.id)
        used = sum(n for _, n in others)
        names = ", ".join(f"{j} ({n})" for j, n in others[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        return (f"waiting for {job.spec.resources.num_ranks} free ranks: {used} of "
                f"{self.total_ranks} are in use by {names}{more}" if others else
                f"waiting for {job.spec.resources.num_ranks} free ranks of {self.total_ranks}")

    def start(self, job: JobRecord, attempt: int) -> None:
        with self._lock:
            old = self._drivers.get(job.id)
        if old is not None and _alive(old.pid):
            self._kill(old)
        log_path = self.dir / f"{job.id}-{attempt}.log"
        exit_path = self.dir / f"{job.id}-{attempt}.exit"
        exit_path.unlink(missing_ok=True)
        cmd = [self.python, "-m", "workers.driver", "--job", job.id, "--attempt",
               str(attempt), "--controller", self.controller_address,
               "--exit-file", str(exit_path)]
        env = self._driver_env(job.id, attempt)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        rec = DriverRecord(job_id=job.id, attempt=attempt, pid=proc.pid,
                           num_ranks=job.spec.resources.num_ranks,
                           log_path=str(log_path), exit_path=str(exit_path))
        with self._lock:
            self._children[proc.pid] = proc
            self._drivers[job.id] = rec
        self._save(rec)

    def _driver_env(self, job_id: str, attempt: int) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        for name in (WORKER_SECRET_ENV, CONTROLLER_CA_ENV):  # never the controller's own
            env.pop(name, None)
        if self.worker_secret is not None:
            env[WORKER_SECRET_ENV] = self.worker_secret(job_id, attempt)
        if self.controller_ca:
            env[CONTROLLER_CA_ENV] = self.controller_ca
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def tracks(self, job_id: str, attempt: int) -> bool:
        with self._lock:
            rec = self._drivers.get(job_id)
            return rec is not None and rec.attempt == attempt

    def stop(self, job_id: str) -> None:
        """Let the workers drain at a step boundary; kill them after `drain_timeout_s`."""
        with self._lock:
            rec = self._drivers.get(job_id)
            if rec is None:
                self._events.put(LauncherEvent(job_id=job_id, attempt=0,
                                               kind=EventKind.STOPPED))
                return
            if rec.stopping:
                return
            rec.stopping = True
            rec.kill_at = time.time() + self.drain_timeout_s
        self._save(rec)

    def _kill(self, rec: DriverRecord, grace_s: float = 5.0) -> None:
        """SIGTERM the driver's session (driver, its Ray, its actors), SIGKILL if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(rec.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._running(rec.pid):
                time.sleep(0.05)
            if not self._running(rec.pid):
                return

    def _running(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        return _alive(pid)

    def report(self, event: LauncherEvent) -> None:
        """Queue an event observed elsewhere (the gRPC service) for the next poll; takes
        no lock, so it returns at once whatever the state machine's thread is doing."""
        self._events.put(event)

    def poll(self) -> list[LauncherEvent]:
        with self._lock:
            drivers = list(self._drivers.values())
        for rec in drivers:  # only the state machine's thread changes them: no lock needed
            self._forward_logs(rec)
            if rec.stopping and time.time() >= rec.kill_at:
                self._kill(rec)
            if self._running(rec.pid):
                continue
            self._events.put(self._exit_event(rec))
            self._forget(rec)
        return drain_events(self._events)

    def _exit_event(self, rec: DriverRecord) -> LauncherEvent:
        if rec.stopping:
            return LauncherEvent(job_id=rec.job_id, attempt=rec.attempt, kind=EventKind.STOPPED)
        code, message = None, "driver process vanished without an exit status"
        reason = ""
        try:
            info = json.loads(Path(rec.exit_path).read_text())
            code, message = int(info["code"]), str(info.get("message", ""))
            reason = str(info.get("reason", ""))
        except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
            child = self._children.get(rec.pid)
            if child is not None and child.returncode is not None:
                code = child.returncode
                message = f"driver exited with status {code} without an exit file"
        outcomes: dict[int | None, EventKind] = {EXIT_OK: EventKind.COMPLETED,
                                                 EXIT_FAILED: EventKind.FAILED}
        kind = outcomes.get(code, EventKind.WORKER_LOST)
        return LauncherEvent(job_id=rec.job_id, attempt=rec.attempt, kind=kind, message=message,
                             reason=reason if kind is EventKind.FAILED else "")

    def _forget(self, rec: DriverRecord) -> None:
        with self._lock:
            if self._drivers.get(rec.job_id) is rec:
                del self._drivers[rec.job_id]
            self._children.pop(rec.pid, None)
        self._record_path(rec.job_id).unlink(missing_ok=True)

    def _forward_logs(self, rec: DriverRecord) -> None:
        if self.on_logs is None:
            return
        try:
            with open(rec.log_path, "rb") as f:
                f.seek(rec.log_offset)
                chunk = f.read(_LOG_CHUNK)
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1
        if end == 0:
            return
        rec.log_offset += end
        lines = chunk[:end].decode("utf-8", "replace").splitlines()
        try:
            self.on_logs(rec.job_id, lines)
        finally:
            self._save(rec)

    def close(self) -> None:
        """Drop our handles; the drivers keep running (they outlive the controller)."""
        with self._lock:
            self._children.clear()
