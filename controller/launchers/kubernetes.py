"""Kubernetes launcher: one KubeRay `RayCluster` per job attempt, the driver run through Ray.

Lifecycle of an attempt (`start(job, attempt)`):
0. with a Kueue queue, `admit(job)` already created the next attempt's RayCluster
   suspended and says no (the job stays Pending, "waiting for Kueue admission in queue X")
   until Kueue lifts `spec.suspend` for the whole gang; `start` then takes that cluster
   over and its readiness clock starts; a queued cluster of a job that no longer waits is
   deleted (`retain_waiting`). No lock is held across the API calls of this path;
1. create the attempt's worker Secret (its gRPC secret, controller.worker_auth; the pods
   read it from there) and the RayCluster (controller.launchers.kuberay builds both) in the
   job's namespace;
2. `poll()` waits until KubeRay reports it ready (`status.state == "ready"` or the
   `RayClusterProvisioned` condition), at most `ready_timeout_s`; then submits the driver
   (`python -m workers.driver --job ID --attempt A --controller ADDR`) to the head's Ray
   job API, with a deterministic submission id so a restarted controller never submits twice;
3. while it runs, the driver's Ray job status maps to events with the Ray launcher's exit
   protocol (0 COMPLETED, 3 FAILED, anything else WORKER_LOST), and the pod watch
   (controller.launchers.podwatch) turns pod failures into WORKER_LOST/FAILED, which feed
   the job's restart policy in the state machine; READY comes from the gRPC service
   (`report()`) once every rank registered, exactly as with the Ray launcher;
4. the RayCluster and its Secret are deleted when the attempt ends (COMPLETED/FAILED
   here, WORKER_LOST and stop requests through `stop()`); STOPPED is reported once the
   API server no longer has it.

A watch thread per namespace lists and watches this controller's pods (label selector on
`ringmaster.io/owner`) and queues the events; `poll()` drains the queue, so every call the
state machine makes stays non-blocking apart from a few API requests (each cluster is
checked at most every `check_interval_s`). A restarted controller lists its RayClusters
and adopts them. API verbs used are exactly `kuberay.LAUNCHER_RBAC_RULES` (the chart's Role).

The Kubernetes and Ray clients are injected (`custom_api`, `core_api`, `ray_jobs`,
`watch_factory`): in a pod the defaults use the in-cluster service account; tests pass fakes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from controller.launchers.base import EventKind, Launcher, LauncherEvent
from controller.launchers.kuberay import (
    GROUP,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LAUNCHER_RBAC_RULES,
    PLURAL,
    VERSION,
    ClusterSettings,
    SharedVolume,
    build_raycluster,
    build_worker_secret,
    cluster_name,
    driver_entrypoint,
    head_dashboard_url,
    is_suspended,
    job_pods,
    job_shape,
    owner_selector,
    worker_secret_name,
)
from controller.launchers.podwatch import PodTracker
from controller.launchers.workerpods import WorkerPodSettings
from controller.spec import JobCreate
from controller.states import JobRecord, State
from scheduler.errors import SpecError

log = logging.getLogger(__name__)

EXIT_FAILED = 3  # driver exit status for "a restart will not help" (as the Ray launcher)
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "127.0.0.1", "localhost", "")
FORWARDED_OTEL_SKIP = ("OTEL_SERVICE_NAME",)  # workers name themselves

__all__ = ["KubernetesLauncher", "KubernetesLauncherConfig", "LAUNCHER_RBAC_RULES"]


@dataclass(frozen=True, kw_only=True)
class KubernetesLauncherConfig:
    """How this controller's jobs run on Kubernetes (the chart sets it through env)."""

    namespaces: tuple[str, ...]  # where RayClusters may go; jobs use the first
    cluster: ClusterSettings  # what every RayCluster shares (image, addresses, owner...)
    ready_timeout_s: float = 900.0  # a RayCluster not ready by then loses the attempt
    max_gpus: int = 0  # admission: GPUs all running attempts may hold together (0: no cap)
    check_interval_s: float = 2.0  # least time between API checks of one cluster
    api_timeout_s: float = 30.0  # bound on one Kubernetes or Ray job API request

    def __post_init__(self) -> None:
        if not self.namespaces:
            raise ValueError("namespaces=() must name at least one namespace")
        if self.ready_timeout_s <= 0:
            raise ValueError(f"ready_timeout_s={self.ready_timeout_s} must be > 0")
        if self.max_gpus < 0:
            raise ValueError(f"max_gpus={self.max_gpus} must be >= 0 (0: no cap)")

    @classmethod
    def from_env(cls, controller_address: str,
                 env: Mapping[str, str] | None = None) -> KubernetesLauncherConfig:
        """Read the RINGMASTER_K8S_* variables the Helm chart sets (docs/deploy.md)."""
        env = os.environ if env is None else env
        address = env.get("RINGMASTER_CONTROLLER_ADDRESS") or controller_address
        if address.rsplit(":", 1)[0] in WILDCARD_HOSTS:
            raise ValueError(f"controller_address={address!r} is not reachable from worker "
                             "pods; set RINGMASTER_CONTROLLER_ADDRESS to the controller "
                             "Service's host:port (the Helm chart does)")
        image = env.get("RINGMASTER_K8S_IMAGE", "")
        if not image:
            raise ValueError("RINGMASTER_K8S_IMAGE is not set: the image of the Ray pods")
        head = _json_env(env, "RINGMASTER_K8S_HEAD_RESOURCES")
        volumes = _json_env(env, "RINGMASTER_K8S_VOLUMES", kind=list) or []
        gpu = env.get("RINGMASTER_K8S_GPU_RESOURCE", "nvidia.com/gpu")
        workers = WorkerPodSettings.from_json(
            _json_env(env, "RINGMASTER_K8S_WORKERS") or {}, gpu_resource=gpu,
            queue_name=env.get("RINGMASTER_K8S_KUEUE_QUEUE", ""))
        settings = ClusterSettings(
            image=image, ray_version=env.get("RINGMASTER_K8S_RAY_VERSION") or _ray_version(),
            controller_address=address, owner=env.get("RINGMASTER_K8S_OWNER", "ringmaster"),
            gpu_resource=gpu, workers=workers,
            cpus_per_rank=_int_env(env, "RINGMASTER_K8S_CPUS_PER_RANK", 8),
            host_memory_fraction=_float_env(env, "RINGMASTER_K8S_HOST_MEMORY_FRACTION", 0.85),
            env={k: v for k, v in env.items()
                 if k.startswith("OTEL_") and k not in FORWARDED_OTEL_SKIP
                 and "HEADERS" not in k},  # headers may hold collector credentials
            image_pull_secrets=_names(env.get("RINGMASTER_K8S_IMAGE_PULL_SECRETS", "")),
            volumes=tuple(SharedVolume.from_json(v) for v in volumes),
            **({"head_resources": head} if head else {}))
        return cls(namespaces=_namespaces(env), cluster=settings,
                   ready_timeout_s=_float_env(env, "RINGMASTER_K8S_READY_TIMEOUT_S", 900.0),
                   max_gpus=_int_env(env, "RINGMASTER_K8S_MAX_GPUS", 0))


def _ray_version() -> str:
    try:
        return version("ray")
    except PackageNotFoundError:
        raise ValueError("RINGMASTER_K8S_RAY_VERSION is not set and Ray is not installed "
                         "here to take its version from") from None


def _names(raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _namespaces(env: Mapping[str, str]) -> tuple[str, ...]:
    names = _names(env.get("RINGMASTER_K8S_NAMESPACES", ""))
    if names:
        return names
    try:  # in a pod: its own namespace
        with open(SA_NAMESPACE_FILE) as f:
            return (f.read().strip(),)
    except OSError:
        raise ValueError("RINGMASTER_K8S_NAMESPACES is not set and this is not a pod "
                         f"({SA_NAMESPACE_FILE} is missing)") from None


def _typed_env(env: Mapping[str, str], name: str, default, kind: type, what: str):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {what}") from None


def _int_env(env, name, default):
    return _typed_env(env, name, default, int, "an integer")


def _float_env(env, name, default):
    return _typed_env(env, name, default, float, "a number")


def _json_env(env: Mapping[str, str], name: str, *, kind: type = dict):
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{name}={raw!r} is not JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name}={raw!r} must be a JSON "
                         f"{'object' if kind is dict else 'list'}")
    return value


@dataclass(kw_only=True)
class _Attempt:
    """One attempt the launcher is running or tearing down."""

    job_id: str
    attempt: int
    namespace: str
    name: str  # RayCluster name
    num_gpus: int  # what admission counts
    phase: str = "provisioning"  # [queued ->] provisioning -> running -> stopping
    deadline: float = 0.0  # provisioning: when readiness times out
    next_check: float = 0.0  # earliest time of the next API check
    # queued (suspended, waiting for Kueue): created by admit() before start() was called
    started: bool = True
    admitted: bool = False  # Kueue lifted spec.suspend

    @property
    def submission_id(self) -> str:
        return f"{self.name}-driver"


@dataclass(kw_only=True)
class _Clients:
    custom: object  # kubernetes.client.CustomObjectsApi (or a fake)
    core: object  # kubernetes.client.CoreV1Api
    ray_jobs: Callable[[str], object]  # dashboard URL -> JobSubmissionClient
    watch_factory: Callable[[], object]  # -> kubernetes.watch.Watch
    serialize: Callable[[object], object] = field(default=lambda obj: obj)


def _default_clients() -> _Clients:
    from kubernetes import client, config, watch

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # A developer's kubeconfig, outside a cluster ($KUBECONFIG as it is now, not as it
        # was when the kubernetes package was imported).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.ApiClient()

    def ray_jobs(address: str):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(address)

    return _Clients(custom=client.CustomObjectsApi(api), core=client.CoreV1Api(api),
                    ray_jobs=ray_jobs, watch_factory=watch.Watch,
                    serialize=api.sanitize_for_serialization)


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _api_message(exc: Exception) -> str:
    """The API server's own words from an ApiException (its Status body), else the error."""
    try:
        return json.loads(getattr(exc, "body", "") or "{}").get("message") or str(exc)
    except (TypeError, ValueError):
        return str(exc)


def check_job_spec(config: KubernetesLauncherConfig, spec: JobCreate) -> None:
    """Raise SpecError (a 422 at submit) when `spec` cannot become a RayCluster here: its
    resources.kubernetes asks for what this controller does not allow, its shape does not
    map onto whole pods. Builds the first attempt's object; calls no API."""
    job = JobRecord(id="submit-check", spec=spec, state=State.PENDING)
    try:
        build_raycluster(job=job, attempt=1, namespace=config.namespaces[0],
                         settings=config.cluster)
    except ValueError as exc:
        raise SpecError(f"invalid job spec for this controller: {exc}") from None


def _is_ready(obj: dict) -> bool:
    status = obj.get("status") or {}
    if str(status.get("state", "")).lower() == "ready":
        return True
    return any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
               for c in status.get("conditions") or [])


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
        injected = (custom_api, core_api, ray_jobs, watch_factory)
        defaults = _default_clients() if any(x is None for x in injected) else None
        self.clients = _Clients(
            custom=custom_api or defaults.custom, core=core_api or defaults.core,
            ray_jobs=ray_jobs or defaults.ray_jobs,
            watch_factory=watch_factory or defaults.watch_factory,
            serialize=defaults.serialize if defaults else (lambda obj: obj))
        self.clock = clock
        self.tracker = PodTracker(self.config.cluster.owner)
        self._lock = threading.Lock()
        self._events: list[LauncherEvent] = []
        self._waiting: dict[str, str] = {}  # job id -> why admit() said no
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._ray_clients: dict[str, object] = {}
        self._ray_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ray-job-api")
        self._timeout = {"_request_timeout": self.config.api_timeout_s}
        self._pod_events: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._watches: list[object] = []
        self._threads: list[threading.Thread] = []
        self._adopted = False
        self._try_adopt()
        if watch:
            for ns in self.config.namespaces:
                t = threading.Thread(target=self._watch_loop, args=(ns,), daemon=True,
                                     name=f"pod-watch-{ns}")
                t.start()
                self._threads.append(t)

    # Launcher -------------------------------------------------------------------------------
    def admit(self, job: JobRecord) -> bool:
        """The GPU cap (maxGpus) first; then, with a Kueue queue, Kueue's own admission:
        the next attempt's RayCluster is created suspended and the job waits (Pending, with
        a message saying so) until Kueue lifts `spec.suspend` for the whole gang."""
        if not self._gpus_fit(job):
            return False
        queue = job_pods(job, self.config.cluster).queue_name
        if not queue:
            self._set_waiting(job.id, "")
            return True
        return self._kueue_admitted(job, queue)

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
            for old in self._live(job.id):
                if old.attempt != attempt:
                    self._delete(old)  # a superseded attempt frees its GPUs first
            if self._promote_queued(job.id, attempt):
                return  # admit() created it (and its Secret) and Kueue admitted it
            if secret:
                self._create_worker_secret(job.id, job.spec.name, attempt, namespace)
            try:
                self.clients.custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, body, **self._timeout)
            except Exception as exc:
                if _status(exc) in (400, 422):  # an object no retry will make valid
                    self._drop_worker_secret(job.id, attempt, namespace)
                    self._events.append(LauncherEvent(
                        job_id=job.id, attempt=attempt, kind=EventKind.FAILED,
                        message=f"the API server refused RayCluster {namespace}/"
                                f"{body['metadata']['name']}: {_api_message(exc)}"))
                    return
                if _status(exc) != 409:
                    raise
                log.info("RayCluster %s/%s already exists; adopting it", namespace,
                         body["metadata"]["name"])
            a = _Attempt(job_id=job.id, attempt=attempt, namespace=namespace,
                         name=body["metadata"]["name"],
                         num_gpus=shape.num_ranks if shape.uses_gpus else 0,
                         deadline=self.clock() + self.config.ready_timeout_s)
            if is_suspended(body):
                a.phase = "queued"  # promoted when Kueue lifts spec.suspend (poll)
            self._attempts[(job.id, attempt)] = a

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
                       and not (a.phase == "queued" and not a.admitted))
        fits = used + need <= cap
        self._set_waiting(job.id, "" if fits else
                          f"waiting for {need} GPUs: {used} of launcher.kubernetes.maxGpus="
                          f"{cap} are held by other jobs")
        return fits

    def _kueue_admitted(self, job: JobRecord, queue: str) -> bool:
        attempt, now = job.attempt + 1, self.clock()
        with self._lock:
            a = self._attempts.get((job.id, attempt))
            due = False
            if a is not None:
                due = a.phase == "queued" and not a.admitted and now >= a.next_check
                if due:
                    a.next_check = now + self.config.check_interval_s
        if a is None:
            a = self._create_queued(job, attempt, queue, now)
            if a is None:  # refused by the API server: start() reports why (FAILED)
                return True
        elif due:
            self._refresh_queued(a)
        if a.phase == "stopping":
            self._set_waiting(job.id, f"waiting for RayCluster {a.namespace}/{a.name} to be "
                                      "deleted")
            return False
        admitted = a.phase != "queued" or a.admitted
        self._set_waiting(job.id, "" if admitted else
                          f"waiting for Kueue admission in queue {queue}")
        return admitted

    def _create_queued(self, job: JobRecord, attempt: int, queue: str,
                       now: float) -> _Attempt | None:
        namespace = self.config.namespaces[0]
        secret = worker_secret_name(job.id, attempt) if self.worker_secret else None
        body = build_raycluster(job=job, attempt=attempt, namespace=namespace,
                                settings=self.config.cluster, worker_secret=secret,
                                with_ca=bool(self.controller_ca))
        if secret:  # before the cluster: Kueue may admit it, and its pods need it, any time
            self._create_worker_secret(job.id, job.spec.name, attempt, namespace)
        try:
            self.clients.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, **self._timeout)
        except Exception as exc:
            if _status(exc) in (400, 422):
                self._drop_worker_secret(job.id, attempt, namespace)
                return None
            if _status(exc) != 409:
                raise
        shape = job_shape(job, self.config.cluster)
        a = _Attempt(job_id=job.id, attempt=attempt, namespace=namespace,
                     name=body["metadata"]["name"],
                     num_gpus=shape.num_ranks if shape.uses_gpus else 0, phase="queued",
                     started=False, next_check=now + self.config.check_interval_s)
        log.info("RayCluster %s/%s created suspended in Kueue queue %s", namespace, a.name,
                 queue)
        with self._lock:
            return self._attempts.setdefault((job.id, attempt), a)

    def _refresh_queued(self, a: _Attempt) -> None:
        try:
            obj = self._get(a)
        except Exception as exc:
            log.info("cannot read queued RayCluster %s/%s: %s", a.namespace, a.name, exc)
            return
        with self._lock:
            if obj is None and a.phase == "queued":  # deleted by someone: created again
                self._attempts.pop((a.job_id, a.attempt), None)
            elif obj is not None and not is_suspended(obj):
                a.admitted = True

    def _promote_queued(self, job_id: str, attempt: int) -> bool:
        """start() of an attempt admit() created: its readiness clock starts now."""
        a = self._attempts.get((job_id, attempt))
        if a is None or a.phase != "queued":
            return False
        a.started = True
        if a.admitted:
            a.phase, a.next_check = "provisioning", 0.0
            a.deadline = self.clock() + self.config.ready_timeout_s
        return True

    def retain_waiting(self, job_ids: set[str]) -> None:
        """Delete the queued clusters of jobs that no longer wait (stopped or deleted
        while queued, possibly through another replica): they would hold a place in
        Kueue's queue, and later its quota, for nothing."""
        with self._lock:
            orphans = [a for a in self._attempts.values() if a.phase == "queued"
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
                   if a.phase == "queued" and a.started and now >= a.next_check]
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
                if a.phase != "queued":
                    continue
                if obj is None:
                    self._lose(a, f"RayCluster {a.namespace}/{a.name} disappeared while "
                                  "waiting for Kueue")
                elif not is_suspended(obj):
                    a.admitted, a.phase, a.next_check = True, "provisioning", 0.0
                    a.deadline = now + self.config.ready_timeout_s

    def _create_worker_secret(self, job_id: str, job_name: str, attempt: int,
                              namespace: str) -> None:
        """Before the pods that read it; its content is a function of (job, attempt), so
        one left by a controller that died mid-start is already right."""
        body = build_worker_secret(job_id=job_id, attempt=attempt, job_name=job_name,
                                   namespace=namespace,
                                   settings=self.config.cluster,
                                   secret=self.worker_secret(job_id, attempt),
                                   controller_ca=self.controller_ca)
        try:
            self.clients.core.create_namespaced_secret(namespace, body, **self._timeout)
        except Exception as exc:
            if _status(exc) != 409:
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
                self._events.append(LauncherEvent(job_id=job_id, attempt=0,
                                                  kind=EventKind.STOPPED))
                return
            for a in live:
                if a.phase != "stopping":
                    self._delete(a)

    def report(self, event: LauncherEvent) -> None:
        """Queue an event observed elsewhere (the gRPC service: READY, a rank lost)."""
        with self._lock:
            self._events.append(event)

    def poll(self) -> list[LauncherEvent]:
        if not self._adopted:
            self._try_adopt()
        self._drain_pod_events()
        now = self.clock()
        self._poll_queued(now)
        with self._lock:
            for a in list(self._attempts.values()):
                if now < a.next_check or a.phase in ("lost", "queued"):
                    continue
                a.next_check = now + self.config.check_interval_s
                check = {"provisioning": self._check_provisioning,
                         "running": self._check_running, "stopping": self._check_stopping}
                try:
                    check[a.phase](a, now)
                except Exception as exc:  # API server hiccup, RBAC change: retry next check
                    log.warning("checking RayCluster %s/%s failed: %s", a.namespace, a.name,
                                exc)
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Stop watching; RayClusters keep running (they outlive the controller)."""
        self._closed.set()
        for w in list(self._watches):
            w.stop()
        for t in self._threads:
            t.join(timeout=5)
        self._ray_pool.shutdown(wait=False, cancel_futures=True)

    # attempt steps (called with the lock held) ------------------------------------------------
    def _live(self, job_id: str) -> list[_Attempt]:
        return [a for a in self._attempts.values() if a.job_id == job_id
                and a.phase != "stopping"]

    def _emit(self, a: _Attempt, kind: EventKind, message: str = "") -> None:
        self._events.append(LauncherEvent(job_id=a.job_id, attempt=a.attempt, kind=kind,
                                          message=message))

    def _lose(self, a: _Attempt, message: str) -> None:
        a.phase = "lost"  # one loss per attempt; the state machine's stop() tears it down
        self._emit(a, EventKind.WORKER_LOST, message)

    def _get(self, a: _Attempt) -> dict | None:
        try:
            return self.clients.serialize(self.clients.custom.get_namespaced_custom_object(
                GROUP, VERSION, a.namespace, PLURAL, a.name, **self._timeout))
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise

    def _delete(self, a: _Attempt) -> None:
        self._mark_deleting(a)
        self._delete_call(a)

    def _mark_deleting(self, a: _Attempt) -> None:
        """(lock held) From now on the attempt is being torn down by us."""
        a.phase, a.next_check = "stopping", 0.0
        self.tracker.ignore_through(a.job_id, a.attempt)
        self._ray_clients.pop(a.submission_id, None)

    def _delete_call(self, a: _Attempt) -> None:
        try:
            self.clients.custom.delete_namespaced_custom_object(
                GROUP, VERSION, a.namespace, PLURAL, a.name, propagation_policy="Foreground",
                **self._timeout)
        except Exception as exc:
            if _status(exc) != 404:
                raise
        self._drop_worker_secret(a.job_id, a.attempt, a.namespace)

    def _drop_worker_secret(self, job_id: str, attempt: int, namespace: str) -> None:
        if self.worker_secret is None:
            return
        try:
            self.clients.core.delete_namespaced_secret(
                worker_secret_name(job_id, attempt), namespace, **self._timeout)
        except Exception as exc:
            if _status(exc) != 404:
                raise

    def _check_provisioning(self, a: _Attempt, now: float) -> None:
        obj = self._get(a)
        if obj is None:
            self._lose(a, f"RayCluster {a.namespace}/{a.name} disappeared before it was ready")
        elif _is_ready(obj):
            self._submit(a, now)
        elif now >= a.deadline:
            self._lose(a, f"RayCluster {a.namespace}/{a.name} not ready after "
                          f"{self.config.ready_timeout_s:g} s: "
                          f"{self.tracker.diagnose(a.job_id, a.attempt)}")

    def _ray_call(self, a: _Attempt, method: str, *args, **kwargs):
        """One Ray job API call on the attempt's head, bounded by api_timeout_s (the Ray
        client sets no timeout of its own; a hung head must not stall the state machine)."""
        def call():
            if a.submission_id not in self._ray_clients:
                self._ray_clients[a.submission_id] = self.clients.ray_jobs(
                    head_dashboard_url(a.name, a.namespace))
            return getattr(self._ray_clients[a.submission_id], method)(*args, **kwargs)

        future = self._ray_pool.submit(call)
        try:
            return future.result(timeout=self.config.api_timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"Ray job API of {a.name}: {method} took over "
                               f"{self.config.api_timeout_s:g} s") from None

    def _submit(self, a: _Attempt, now: float) -> None:
        entrypoint = shlex.join(driver_entrypoint(a.job_id, a.attempt,
                                                  self.config.cluster.controller_address))
        try:
            self._ray_call(a, "submit_job", entrypoint=entrypoint,
                           submission_id=a.submission_id,
                           metadata={LABEL_JOB: a.job_id, LABEL_ATTEMPT: str(a.attempt)})
        except Exception as exc:
            if "already exists" not in str(exc):  # else: submitted before a restart of ours
                if now >= a.deadline:
                    self._lose(a, f"driver of {a.name} could not be submitted: {exc}")
                else:
                    log.info("submitting the driver of %s failed (%s); retrying", a.name, exc)
                return
        a.phase = "running"

    def _check_running(self, a: _Attempt, now: float) -> None:
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
            self._lose(a, f"driver {status.lower()} (exit status {code}): {detail}".rstrip(": "))

    def _check_stopping(self, a: _Attempt, now: float) -> None:
        if self._get(a) is not None:
            return  # KubeRay and the garbage collector are still removing pods
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
        """Find this controller's RayClusters (after a restart) and resume tracking them."""
        selector = owner_selector(self.config.cluster)
        found: list[_Attempt] = []
        for ns in self.config.namespaces:
            listing = self.clients.serialize(self.clients.custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, label_selector=selector, **self._timeout))
            for obj in listing.get("items") or []:
                a = self._attempt_from(obj, ns)
                if a is not None:
                    found.append(a)
        newest: dict[str, int] = {}
        for a in found:
            newest[a.job_id] = max(a.attempt, newest.get(a.job_id, 0))
        with self._lock:
            for a in found:
                self._attempts[(a.job_id, a.attempt)] = a
                if a.attempt < newest[a.job_id] and a.phase != "stopping":
                    self._delete(a)
        if found:
            log.info("adopted %d RayCluster(s) of a previous controller run", len(found))

    def _attempt_from(self, obj: dict, namespace: str) -> _Attempt | None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            job_id, attempt = labels[LABEL_JOB], int(labels[LABEL_ATTEMPT])
        except (KeyError, ValueError):
            log.warning("RayCluster %s/%s carries our owner label but no job/attempt labels; "
                        "leaving it alone", namespace, meta.get("name"))
            return None
        groups = (obj.get("spec") or {}).get("workerGroupSpecs") or []
        gpus = sum(int(g.get("replicas", 0)) * int(g.get("rayStartParams", {})
                                                    .get("num-gpus", 0)) for g in groups)
        a = _Attempt(job_id=job_id, attempt=attempt, namespace=namespace,
                     name=meta.get("name", cluster_name(job_id, attempt)), num_gpus=gpus,
                     deadline=self.clock() + self.config.ready_timeout_s)
        if meta.get("deletionTimestamp"):
            a.phase = "stopping"
            self.tracker.ignore_through(job_id, attempt)
        elif is_suspended(obj):  # still in Kueue's queue: admit() asks about it again
            a.phase, a.started = "queued", False
        return a

    # pod watch ----------------------------------------------------------------------------
    def sync_pods(self, namespace: str, *, timeout_s: int = 300) -> None:
        """One list + one watch pass over this controller's pods in `namespace`.

        Events are queued for the next `poll()`; a pod that vanished while nobody watched
        (missing from the list) counts as deleted.
        """
        core, selector = self.clients.core, owner_selector(self.config.cluster)
        listing = self.clients.serialize(core.list_namespaced_pod(
            namespace, label_selector=selector, **self._timeout))
        pods = listing.get("items") or []
        self._pod_events.put(("RESYNC", {"namespace": namespace, "pods": pods}))
        version = (listing.get("metadata") or {}).get("resourceVersion")
        w = self.clients.watch_factory()
        self._watches.append(w)
        try:
            for ev in w.stream(core.list_namespaced_pod, namespace=namespace,
                               label_selector=selector, resource_version=version,
                               timeout_seconds=timeout_s):
                if self._closed.is_set():
                    break
                if ev.get("type") == "ERROR":  # e.g. 410 Gone: our version is too old; relist
                    break
                pod = ev.get("raw_object") or self.clients.serialize(ev["object"])
                self._pod_events.put((ev["type"], pod))
        finally:
            w.stop()
            self._watches.remove(w)

    def _watch_loop(self, namespace: str) -> None:
        backoff = 1.0
        while not self._closed.is_set():
            began = time.monotonic()
            try:
                self.sync_pods(namespace)
                backoff = 1.0
                if time.monotonic() - began < 1.0:  # a server closing watches at once:
                    self._closed.wait(1.0)  # relist at most once a second
            except Exception as exc:  # API server restart, expired token, network
                log.warning("pod watch in %s failed (%s); retrying in %.0f s", namespace, exc,
                            backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 60.0)

    def _drain_pod_events(self) -> None:
        while True:
            try:
                kind, obj = self._pod_events.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                if kind == "RESYNC":
                    self._events += self.tracker.resync(obj["namespace"], obj["pods"])
                else:
                    self._events += self.tracker.observe(kind, obj)
