"""Kubernetes launcher: one KubeRay `RayCluster` per job attempt, the driver run through Ray.

Lifecycle of an attempt (`start(job, attempt)`; phases in
controller.launchers.kubernetes_attempt):
0. with a Kueue queue, `admit(job)` already created the next attempt's RayCluster
   suspended and says no (the job stays Pending, "waiting for Kueue admission in queue X")
   until Kueue lifts `spec.suspend` for the whole gang; `start` then takes that cluster
   over and its readiness clock starts; a queued cluster of a job that no longer waits is
   deleted (`retain_waiting`);
1. create the attempt's worker Secret (its gRPC secret, controller.worker_auth; the pods
   read it from there) and the RayCluster (controller.launchers.kuberay builds both) in the
   job's namespace;
2. `poll()` waits until KubeRay reports it ready (`status.state == "ready"` or the
   `RayClusterProvisioned` condition), at most `ready_timeout_s`; then submits the driver
   (`python -m workers.driver --job ID --attempt A --controller ADDR`) to the head's Ray
   job API, with a deterministic submission id so a restarted controller never submits twice;
3. while it runs, the driver's Ray job status maps to events with the driver's exit
   protocol (scheduler.driver_exit: 0 COMPLETED, 3 FAILED, anything else WORKER_LOST), and
   the pod watch (controller.launchers.podwatch) turns pod failures into WORKER_LOST/FAILED,
   which feed the job's restart policy in the state machine; READY comes from the gRPC
   service (`report()`) once every rank registered, exactly as with the Ray launcher;
4. the RayCluster and its Secret are deleted when the attempt ends (COMPLETED/FAILED
   here, WORKER_LOST and stop requests through `stop()`); STOPPED is reported once the
   API server no longer has it.

A watch thread per namespace (controller.launchers.kubernetes_api.PodWatch) lists and
watches this controller's pods and queues the events; `poll()` drains the queue, so every
call the state machine makes stays non-blocking apart from a few API requests (each
cluster is checked at most every `check_interval_s`). A restarted controller lists its
RayClusters and adopts them. API verbs used are exactly `kuberay.LAUNCHER_RBAC_RULES`
(the chart's Role). Configuration comes from controller.launchers.kubernetes_config.

Concurrency: `report()` is called from the gRPC service's threads; it only puts the event
on a queue (no lock), so no rank's RPC ever waits for the API server. Every other call
comes from the state machine's thread. `self._lock` guards the tables (attempts, waiting
messages, Ray job clients) and the pod tracker for readers such as `tracks` and
`admission_message`; it is taken for snapshots and updates only and never held across a
Kubernetes or Ray job API request (tests/deploy/test_kubernetes_launcher_locks.py holds
it to that with an API server that blocks).

The Kubernetes and Ray clients are injected (`custom_api`, `core_api`, `ray_jobs`,
`watch_factory`): in a pod the defaults use the in-cluster service account; tests pass fakes.
"""

from __future__ import annotations

import logging
import queue
import shlex
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from controller.launchers.base import EventKind, Launcher, LauncherEvent, drain_events
from controller.launchers.kuberay import (
    GROUP,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LAUNCHER_RBAC_RULES,
    PLURAL,
    VERSION,
    build_raycluster,
    build_worker_secret,
    driver_entrypoint,
    head_dashboard_url,
    is_suspended,
    job_pods,
    job_shape,
    owner_selector,
    worker_secret_name,
)
from controller.launchers.kubernetes_api import (
    RESYNC,
    Clients,
    PodWatch,
    api_message,
    api_status,
    default_clients,
)
from controller.launchers.kubernetes_attempt import Attempt, Phase, attempt_from, is_ready
from controller.launchers.kubernetes_config import KubernetesLauncherConfig, check_job_spec
from controller.launchers.podwatch import PodTracker
from controller.spec import JobCreate
from controller.states import JobRecord
from scheduler.driver_exit import EXIT_FAILED

log = logging.getLogger(__name__)

__all__ = ["KubernetesLauncher", "KubernetesLauncherConfig", "LAUNCHER_RBAC_RULES", "Phase",
           "check_job_spec"]


class KubernetesLauncher(Launcher):
    """Runs each job attempt on its own KubeRay RayCluster (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, *, controller_address: str = "",
                 config: KubernetesLauncherConfig | None = None,
                 custom_api=None, core_api=None, ray_jobs: Callable[[str], object] | None = None,
                 watch_factory: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic, watch: bool = True,
                 worker_secret: Callable[[str, int], str] | None = None,
                 controller_ca: str | None = None):
        self.config = config or KubernetesLauncherConfig.from_env(controller_address)
        self.worker_secret = worker_secret  # (job id, attempt) -> the attempt's secret
        self.controller_ca = Path(controller_ca).read_text() if controller_ca else None
        if custom_api is None or core_api is None or ray_jobs is None or watch_factory is None:
            defaults = default_clients()
            self.clients = Clients(
                custom=custom_api or defaults.custom, core=core_api or defaults.core,
                ray_jobs=ray_jobs or defaults.ray_jobs,
                watch_factory=watch_factory or defaults.watch_factory,
                serialize=defaults.serialize)
        else:
            self.clients = Clients(custom=custom_api, core=core_api, ray_jobs=ray_jobs,
                                   watch_factory=watch_factory)
        self.clock = clock
        self.tracker = PodTracker(self.config.cluster.owner)
        self._lock = threading.Lock()  # tables and tracker; never held across an API call
        self._events: queue.SimpleQueue[LauncherEvent] = queue.SimpleQueue()
        self._waiting: dict[str, str] = {}  # job id -> why admit() said no
        self._attempts: dict[tuple[str, int], Attempt] = {}
        self._ray_clients: dict[str, object] = {}
        self._ray_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ray-job-api")
        self._timeout = {"_request_timeout": self.config.api_timeout_s}
        self._pods = PodWatch(self.clients, selector=owner_selector(self.config.cluster),
                              request_timeout=self._timeout)
        self._threads = self._pods.threads
        self._adopted = False
        self._try_adopt()
        if watch:
            self._pods.start(self.config.namespaces)

    # Launcher -------------------------------------------------------------------------------
    def admit(self, job: JobRecord) -> bool:
        """The GPU cap (maxGpus) first; then, with a Kueue queue, Kueue's own admission:
        the next attempt's RayCluster is created suspended and the job waits (Pending, with
        a message saying so) until Kueue lifts `spec.suspend` for the whole gang."""
        if not self._gpus_fit(job):
            return False
        queue_name = job_pods(job, self.config.cluster).queue_name
        if not queue_name:
            self._set_waiting(job.id, "")
            return True
        return self._kueue_admitted(job, queue_name)

    def admission_message(self, job: JobRecord) -> str:
        with self._lock:
            return self._waiting.get(job.id, "")

    def check_spec(self, spec: JobCreate) -> None:
        check_job_spec(self.config, spec)

    def start(self, job: JobRecord, attempt: int) -> None:
        namespace = self.config.namespaces[0]
        secret = worker_secret_name(job.id, attempt) if self.worker_secret else None
        body = build_raycluster(job=job, attempt=attempt, namespace=namespace,
                                settings=self.config.cluster, worker_secret=secret,
                                with_ca=bool(self.controller_ca))
        shape = job_shape(job, self.config.cluster)
        self._set_waiting(job.id, "")
        with self._lock:
            superseded = [old for old in self._live(job.id) if old.attempt != attempt]
        for old in superseded:
            self._delete(old)  # a superseded attempt frees its GPUs first
        with self._lock:
            if self._promote_queued(job.id, attempt):
                return  # admit() created it (and its Secret) and Kueue admitted it
        refused = self._create(job, attempt, namespace, body, secret)
        if refused is not None:
            self._events.put(LauncherEvent(
                job_id=job.id, attempt=attempt, kind=EventKind.FAILED,
                message=f"the API server refused RayCluster {namespace}/"
                        f"{body['metadata']['name']}: {api_message(refused)}"))
            return
        a = Attempt(job_id=job.id, attempt=attempt, namespace=namespace,
                    name=body["metadata"]["name"],
                    num_gpus=shape.num_ranks if shape.uses_gpus else 0,
                    deadline=self.clock() + self.config.ready_timeout_s)
        if is_suspended(body):
            a.phase = Phase.QUEUED  # promoted when Kueue lifts spec.suspend (poll)
        with self._lock:
            self._attempts[(job.id, attempt)] = a

    def _create(self, job: JobRecord, attempt: int, namespace: str, body: dict,
                secret: str | None) -> Exception | None:
        """The attempt's Secret (before the pods that read it), then its RayCluster; one
        that already exists (409: created before a restart of ours) is taken as it is.
        Returns the API server's refusal (400/422: no retry makes the object valid), with
        the Secret removed again; other errors raise."""
        if secret:
            self._create_worker_secret(job.id, job.spec.name, attempt, namespace)
        try:
            self.clients.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, **self._timeout)
        except Exception as exc:
            if api_status(exc) in (400, 422):
                self._drop_worker_secret(job.id, attempt, namespace)
                return exc
            if api_status(exc) != 409:
                raise
            log.info("RayCluster %s/%s already exists; adopting it", namespace,
                     body["metadata"]["name"])
        return None

    # Kueue and the GPU cap (no lock held across API calls) -------------------------------
    def _set_waiting(self, job_id: str, message: str) -> None:
        with self._lock:
            if message:
                self._waiting[job_id] = message
            else:
                self._waiting.pop(job_id, None)

    def _gpus_fit(self, job: JobRecord) -> bool:
        cap = self.config.max_gpus
        if cap == 0:
            return True
        shape = job_shape(job, self.config.cluster)
        need = shape.num_ranks if shape.uses_gpus else 0
        with self._lock:
            used = sum(a.num_gpus for a in self._attempts.values() if a.job_id != job.id
                       and not (a.phase is Phase.QUEUED and not a.admitted))
        fits = used + need <= cap
        self._set_waiting(job.id, "" if fits else
                          f"waiting for {need} GPUs: {used} of launcher.kubernetes.maxGpus="
                          f"{cap} are held by other jobs")
        return fits

    def _kueue_admitted(self, job: JobRecord, queue_name: str) -> bool:
        attempt, now = job.attempt + 1, self.clock()
        with self._lock:
            a = self._attempts.get((job.id, attempt))
            due = False
            if a is not None:
                due = a.phase is Phase.QUEUED and not a.admitted and now >= a.next_check
                if due:
                    a.next_check = now + self.config.check_interval_s
        if a is None:
            a = self._create_queued(job, attempt, queue_name, now)
            if a is None:  # refused by the API server: start() reports why (FAILED)
                return True
        elif due:
            self._refresh_queued(a)
        if a.phase is Phase.STOPPING:
            self._set_waiting(job.id, f"waiting for RayCluster {a.namespace}/{a.name} to be "
                                      "deleted")
            return False
        admitted = a.phase is not Phase.QUEUED or a.admitted
        self._set_waiting(job.id, "" if admitted else
                          f"waiting for Kueue admission in queue {queue_name}")
        return admitted

    def _create_queued(self, job: JobRecord, attempt: int, queue_name: str,
                       now: float) -> Attempt | None:
        namespace = self.config.namespaces[0]
        secret = worker_secret_name(job.id, attempt) if self.worker_secret else None
        body = build_raycluster(job=job, attempt=attempt, namespace=namespace,
                                settings=self.config.cluster, worker_secret=secret,
                                with_ca=bool(self.controller_ca))
        # The Secret first: Kueue may admit the cluster, and its pods need it, any time.
        if self._create(job, attempt, namespace, body, secret) is not None:
            return None
        shape = job_shape(job, self.config.cluster)
        a = Attempt(job_id=job.id, attempt=attempt, namespace=namespace,
                    name=body["metadata"]["name"],
                    num_gpus=shape.num_ranks if shape.uses_gpus else 0, phase=Phase.QUEUED,
                    started=False, next_check=now + self.config.check_interval_s)
        log.info("RayCluster %s/%s created suspended in Kueue queue %s", namespace, a.name,
                 queue_name)
        with self._lock:
            return self._attempts.setdefault((job.id, attempt), a)

    def _refresh_queued(self, a: Attempt) -> None:
        try:
            obj = self._get(a)
        except Exception as exc:
            log.info("cannot read queued RayCluster %s/%s: %s", a.namespace, a.name, exc)
            return
        with self._lock:
            if obj is None and a.phase is Phase.QUEUED:  # deleted by someone: created again
                self._attempts.pop((a.job_id, a.attempt), None)
            elif obj is not None and not is_suspended(obj):
                a.admitted = True

    def _promote_queued(self, job_id: str, attempt: int) -> bool:
        """(lock held) start() of an attempt admit() created: its readiness clock starts."""
        a = self._attempts.get((job_id, attempt))
        if a is None or a.phase is not Phase.QUEUED:
            return False
        a.started = True
        if a.admitted:
            a.phase, a.next_check = Phase.PROVISIONING, 0.0
            a.deadline = self.clock() + self.config.ready_timeout_s
        return True

    def retain_waiting(self, job_ids: set[str]) -> None:
        """Delete the queued clusters of jobs that no longer wait (stopped or deleted
        while queued, possibly through another replica): they would hold a place in
        Kueue's queue, and later its quota, for nothing."""
        with self._lock:
            orphans = [a for a in self._attempts.values() if a.phase is Phase.QUEUED
                       and not a.started and a.job_id not in job_ids]
            for a in orphans:
                self._mark_deleting(a)
        for a in orphans:
            log.info("deleting queued RayCluster %s/%s: job %s no longer waits for it",
                     a.namespace, a.name, a.job_id)
            try:
                self._delete_call(a)
            except Exception as exc:  # stays "stopping": the next poll checks it again
                log.warning("deleting RayCluster %s/%s failed: %s", a.namespace, a.name, exc)

    def _poll_queued(self, now: float) -> None:
        """Started clusters Kueue has not admitted yet: promote the admitted ones."""
        with self._lock:
            due = [a for a in self._attempts.values()
                   if a.phase is Phase.QUEUED and a.started and now >= a.next_check]
            for a in due:
                a.next_check = now + self.config.check_interval_s
        for a in due:
            try:
                obj = self._get(a)
            except Exception as exc:
                log.warning("checking queued RayCluster %s/%s failed: %s", a.namespace,
                            a.name, exc)
                continue
            with self._lock:
                if a.phase is not Phase.QUEUED:
                    continue
                if obj is None:
                    self._lose(a, f"RayCluster {a.namespace}/{a.name} disappeared while "
                                  "waiting for Kueue")
                elif not is_suspended(obj):
                    a.admitted, a.phase, a.next_check = True, Phase.PROVISIONING, 0.0
                    a.deadline = now + self.config.ready_timeout_s

    def _create_worker_secret(self, job_id: str, job_name: str, attempt: int,
                              namespace: str) -> None:
        """Before the pods that read it; its content is a function of (job, attempt), so
        one left by a controller that died mid-start is already right."""
        assert self.worker_secret is not None, "secrets are made only for a launcher given one"
        body = build_worker_secret(job_id=job_id, attempt=attempt, job_name=job_name,
                                   namespace=namespace,
                                   settings=self.config.cluster,
                                   secret=self.worker_secret(job_id, attempt),
                                   controller_ca=self.controller_ca)
        try:
            self.clients.core.create_namespaced_secret(namespace, body, **self._timeout)
        except Exception as exc:
            if api_status(exc) != 409:
                raise

    def tracks(self, job_id: str, attempt: int) -> bool | None:
        if not self._adopted:
            return None  # the API server has not told us what runs yet
        with self._lock:
            return (job_id, attempt) in self._attempts

    def stop(self, job_id: str) -> None:
        self._set_waiting(job_id, "")
        with self._lock:
            live = [a for a in self._attempts.values() if a.job_id == job_id]
        if not live:
            self._events.put(LauncherEvent(job_id=job_id, attempt=0, kind=EventKind.STOPPED))
            return
        for a in live:
            if a.phase is not Phase.STOPPING:
                self._delete(a)

    def report(self, event: LauncherEvent) -> None:
        """Queue an event observed elsewhere (the gRPC service: READY, a rank lost). Takes
        no lock: it returns at once, whatever API request the launcher is waiting for."""
        self._events.put(event)

    def poll(self) -> list[LauncherEvent]:
        if not self._adopted:
            self._try_adopt()
        self._drain_pod_events()
        now = self.clock()
        self._poll_queued(now)
        with self._lock:
            due = [a for a in self._attempts.values() if now >= a.next_check
                   and a.phase not in (Phase.LOST, Phase.QUEUED)]
            for a in due:
                a.next_check = now + self.config.check_interval_s
        check = {Phase.PROVISIONING: self._check_provisioning,
                 Phase.RUNNING: self._check_running, Phase.STOPPING: self._check_stopping}
        for a in due:
            try:
                check[a.phase](a, now)
            except Exception as exc:  # API server hiccup, RBAC change: retry next check
                log.warning("checking RayCluster %s/%s failed: %s", a.namespace, a.name, exc)
        return drain_events(self._events)

    def close(self) -> None:
        """Stop watching; RayClusters keep running (they outlive the controller)."""
        self._pods.close()
        self._ray_pool.shutdown(wait=False, cancel_futures=True)

    # attempt steps: API requests without the lock, state changes under it ----------------
    def _live(self, job_id: str) -> list[Attempt]:
        """(lock held) The job's attempts not being torn down."""
        return [a for a in self._attempts.values() if a.job_id == job_id
                and a.phase is not Phase.STOPPING]

    def _emit(self, a: Attempt, kind: EventKind, message: str = "") -> None:
        self._events.put(LauncherEvent(job_id=a.job_id, attempt=a.attempt, kind=kind,
                                       message=message))

    def _lose(self, a: Attempt, message: str) -> None:
        """(lock held) One loss per attempt; the state machine's stop() tears it down."""
        a.phase = Phase.LOST
        self._emit(a, EventKind.WORKER_LOST, message)

    def _get(self, a: Attempt) -> dict | None:
        try:
            return self.clients.serialize(self.clients.custom.get_namespaced_custom_object(
                GROUP, VERSION, a.namespace, PLURAL, a.name, **self._timeout))
        except Exception as exc:
            if api_status(exc) == 404:
                return None
            raise

    def _delete(self, a: Attempt) -> None:
        with self._lock:
            self._mark_deleting(a)
        self._delete_call(a)

    def _mark_deleting(self, a: Attempt) -> None:
        """(lock held) From now on the attempt is being torn down by us."""
        a.phase, a.next_check = Phase.STOPPING, 0.0
        self.tracker.ignore_through(a.job_id, a.attempt)
        self._ray_clients.pop(a.submission_id, None)

    def _delete_call(self, a: Attempt) -> None:
        try:
            self.clients.custom.delete_namespaced_custom_object(
                GROUP, VERSION, a.namespace, PLURAL, a.name, propagation_policy="Foreground",
                **self._timeout)
        except Exception as exc:
            if api_status(exc) != 404:
                raise
        self._drop_worker_secret(a.job_id, a.attempt, a.namespace)

    def _drop_worker_secret(self, job_id: str, attempt: int, namespace: str) -> None:
        if self.worker_secret is None:
            return
        try:
            self.clients.core.delete_namespaced_secret(
                worker_secret_name(job_id, attempt), namespace, **self._timeout)
        except Exception as exc:
            if api_status(exc) != 404:
                raise

    def _check_provisioning(self, a: Attempt, now: float) -> None:
        obj = self._get(a)
        if obj is not None and is_ready(obj):
            self._submit(a, now)
            return
        with self._lock:
            if obj is None:
                self._lose(a, f"RayCluster {a.namespace}/{a.name} disappeared before it was "
                              "ready")
            elif now >= a.deadline:
                self._lose(a, f"RayCluster {a.namespace}/{a.name} not ready after "
                              f"{self.config.ready_timeout_s:g} s: "
                              f"{self.tracker.diagnose(a.job_id, a.attempt)}")

    def _ray_call(self, a: Attempt, method: str, *args, **kwargs):
        """One Ray job API call on the attempt's head, bounded by api_timeout_s (the Ray
        client sets no timeout of its own; a hung head must not stall the state machine)."""
        def call():
            with self._lock:
                client = self._ray_clients.get(a.submission_id)
            if client is None:  # building one already talks to the head
                client = self.clients.ray_jobs(head_dashboard_url(a.name, a.namespace))
                with self._lock:
                    client = self._ray_clients.setdefault(a.submission_id, client)
            return getattr(client, method)(*args, **kwargs)

        future = self._ray_pool.submit(call)
        try:
            return future.result(timeout=self.config.api_timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"Ray job API of {a.name}: {method} took over "
                               f"{self.config.api_timeout_s:g} s") from None

    def _submit(self, a: Attempt, now: float) -> None:
        entrypoint = shlex.join(driver_entrypoint(a.job_id, a.attempt,
                                                  self.config.cluster.controller_address))
        try:
            self._ray_call(a, "submit_job", entrypoint=entrypoint,
                           submission_id=a.submission_id,
                           metadata={LABEL_JOB: a.job_id, LABEL_ATTEMPT: str(a.attempt)})
        except Exception as exc:
            if "already exists" not in str(exc):  # else: submitted before a restart of ours
                if now >= a.deadline:
                    with self._lock:
                        self._lose(a, f"driver of {a.name} could not be submitted: {exc}")
                else:
                    log.info("submitting the driver of %s failed (%s); retrying", a.name, exc)
                return
        with self._lock:
            a.phase = Phase.RUNNING

    def _check_running(self, a: Attempt, now: float) -> None:
        try:
            info = self._ray_call(a, "get_job_info", a.submission_id)
        except Exception as exc:  # head briefly away; a dead head shows in the pod watch
            log.info("driver status of %s unavailable: %s", a.name, exc)
            return
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            return
        code, detail = getattr(info, "driver_exit_code", None), info.message or ""
        if status == "SUCCEEDED":
            self._emit(a, EventKind.COMPLETED, detail)
            self._delete(a)  # the job is over: give the GPUs back
        elif status == "FAILED" and code == EXIT_FAILED:
            self._emit(a, EventKind.FAILED, detail or f"driver exited with status {code}")
            self._delete(a)
        else:
            with self._lock:
                self._lose(a, f"driver {status.lower()} (exit status {code}): "
                              f"{detail}".rstrip(": "))

    def _check_stopping(self, a: Attempt, now: float) -> None:
        if self._get(a) is not None:
            return  # KubeRay and the garbage collector are still removing pods
        with self._lock:
            del self._attempts[(a.job_id, a.attempt)]
            self._emit(a, EventKind.STOPPED, f"RayCluster {a.namespace}/{a.name} deleted")
            if not any(k[0] == a.job_id for k in self._attempts):
                self.tracker.forget_job(a.job_id)

    # restart recovery -------------------------------------------------------------------------
    def _try_adopt(self) -> None:
        """Adopt now, or on a later poll when the API server cannot be reached yet."""
        try:
            self._adopt()
            self._adopted = True
        except Exception as exc:
            log.warning("cannot list this controller's RayClusters yet (%s); will retry", exc)

    def _adopt(self) -> None:
        """Find this controller's RayClusters (after a restart) and resume tracking them;
        a job's superseded attempts are deleted."""
        selector = owner_selector(self.config.cluster)
        found: list[Attempt] = []
        for ns in self.config.namespaces:
            listing = self.clients.serialize(self.clients.custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, label_selector=selector, **self._timeout))
            for obj in listing.get("items") or []:
                a = attempt_from(obj, ns, deadline=self.clock() + self.config.ready_timeout_s)
                if a is not None:
                    found.append(a)
        newest: dict[str, int] = {}
        for a in found:
            newest[a.job_id] = max(a.attempt, newest.get(a.job_id, 0))
        with self._lock:
            for a in found:
                self._attempts[(a.job_id, a.attempt)] = a
                if a.phase is Phase.STOPPING:
                    self.tracker.ignore_through(a.job_id, a.attempt)
        for a in found:
            if a.attempt < newest[a.job_id] and a.phase is not Phase.STOPPING:
                self._delete(a)
        if found:
            log.info("adopted %d RayCluster(s) of a previous controller run", len(found))

    # pod watch ----------------------------------------------------------------------------
    def sync_pods(self, namespace: str, *, timeout_s: int = 300) -> None:
        """One list + one watch pass over this controller's pods in `namespace` (what each
        watch thread repeats); events are queued for the next `poll()`."""
        self._pods.sync(namespace, timeout_s=timeout_s)

    def _drain_pod_events(self) -> None:
        batch = self._pods.drain()
        with self._lock:
            for kind, obj in batch:
                if kind == RESYNC:
                    events = self.tracker.resync(obj["namespace"], obj["pods"])
                else:
                    events = self.tracker.observe(kind, obj)
                for event in events:
                    self._events.put(event)
