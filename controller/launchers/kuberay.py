"""KubeRay `RayCluster` (ray.io/v1) manifests for one attempt of one job: built, not applied.

One RayCluster per attempt: a head pod that runs the job's driver (`python -m
workers.driver --job ID --attempt A --controller ADDR`, submitted through the Ray job API)
and worker pods that host the rank actors, one pod per node of the job's cluster spec with
that node's GPUs (`gpus_per_node`; the spec guarantees whole nodes). Memory follows the
spec's `host_memory_gib`; CPUs are `cpus_per_rank` per rank. The platform's steering
(node selector, tolerations, affinity, priority class, /dev/shm size, extra env and
extended resources, service account: controller.launchers.workerpods) and the job's own
`resources.kubernetes` are applied to the pod templates; with a Kueue queue the cluster is
labelled for it and created suspended. The RayCluster and every pod carry owner labels
(which controller, job id, job name and attempt) so the launcher finds and watches exactly
its own pods, the chart's NetworkPolicy lets them reach the controller's gRPC port, a
controller restart can find its clusters, and `kubectl get rayclusters,pods -l
ringmaster.io/job-id=<id>` finds a job's objects.

The attempt's worker secret (controller.worker_auth) lives in a Secret of its own
(`worker_secret_name`, `build_worker_secret`), which every Ray container references as
`RINGMASTER_WORKER_SECRET` (and, with TLS, `RINGMASTER_CONTROLLER_CA`): never a literal in
the RayCluster or on a command line.

Pure functions of (job, attempt, settings): no API calls, no clock, so tests check the
objects field by field. `LAUNCHER_RBAC_RULES` is the single list of API verbs the launcher
uses; the Helm chart's Role grants exactly these (tests/deploy hold them equal).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from controller.launchers.workerpods import (
    WorkerPodSettings,
    for_job,
    steer_head,
    steer_worker,
    worker_resources,
)
from controller.states import JobRecord

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayclusters", "RayCluster"

# Labels (ray.io/* ones are set by KubeRay itself on the pods it creates).
LABEL_OWNER = "ringmaster.io/owner"
LABEL_JOB = "ringmaster.io/job-id"
LABEL_JOB_NAME = "ringmaster.io/job-name"
LABEL_ATTEMPT = "ringmaster.io/attempt"
LABEL_WORKER = "ringmaster.io/worker"
LABEL_NODE_TYPE = "ray.io/node-type"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue admits a RayCluster from this queue

# Port names are the ones KubeRay looks up to build the head Service.
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
MAX_CLUSTER_NAME = 40  # KubeRay derives pod/service names from it; keep them under 63
CPU_CLUSTER_PRESETS = frozenset({"cpu"})  # presets whose ranks are CPU processes


@dataclass(frozen=True, kw_only=True)
class RbacRule:
    """One Role rule: an API group, a resource and the verbs used on it."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]
    named: bool = False  # only on this release's own object (the Role's resourceNames)


LAUNCHER_RBAC_RULES: tuple[RbacRule, ...] = (
    RbacRule(api_group=GROUP, resource=PLURAL, verbs=("create", "delete", "get", "list")),
    RbacRule(api_group="", resource="pods", verbs=("list", "watch")),
    RbacRule(api_group="", resource="secrets", verbs=("create", "delete")),  # worker secrets
)
WORKER_SECRET_KEY = "worker-secret"  # keys of the per-attempt Secret
CONTROLLER_CA_KEY = "controller-ca"


def _default_head_resources() -> dict:
    return {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """What every RayCluster of one controller shares (the chart sets it through env)."""

    image: str  # image of head and workers (the Dockerfile's `worker` target)
    ray_version: str  # Ray in that image (spec.rayVersion)
    controller_address: str  # host:port of the controller's gRPC service, seen from pods
    owner: str  # this controller's instance name (label ringmaster.io/owner)
    gpu_resource: str = "nvidia.com/gpu"  # extended resource of one GPU
    head_resources: Mapping = field(default_factory=_default_head_resources)
    cpus_per_rank: int = 8  # CPU cores requested per rank (data loading, NCCL proxies)
    host_memory_fraction: float = 0.85  # share of a node's host memory a worker pod requests
    run_as_user: int = 10001  # non-root UID of the image's user
    env: Mapping[str, str] = field(default_factory=dict)  # extra env (OTEL_* and the like)
    image_pull_secrets: tuple[str, ...] = ()  # Secrets in the job namespace, for the image
    volumes: tuple[SharedVolume, ...] = ()  # datasets and checkpoints, same paths everywhere
    workers: WorkerPodSettings = field(default_factory=WorkerPodSettings)  # steering, Kueue

    def __post_init__(self) -> None:
        for name in ("image", "ray_version", "controller_address", "owner"):
            if not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} must not be empty")
        if ":" not in self.controller_address.rsplit("]", 1)[-1]:
            raise ValueError(f"controller_address={self.controller_address!r} needs host:port")
        if self.cpus_per_rank < 1:
            raise ValueError(f"cpus_per_rank={self.cpus_per_rank} must be >= 1")
        if not 0 < self.host_memory_fraction <= 1:
            raise ValueError(f"host_memory_fraction={self.host_memory_fraction} must be in "
                             "(0, 1]")
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise ValueError(f"volumes: names {names} must be unique")
        if not _LABEL_VALUE.match(self.owner):
            raise ValueError(f"owner={self.owner!r} is not a valid label value (<= 63 "
                             "alphanumerics, '-', '_', '.')")
        if self.workers.gpu_resource != self.gpu_resource:
            raise ValueError(f"workers.gpu_resource={self.workers.gpu_resource!r} differs "
                             f"from gpu_resource={self.gpu_resource!r}")


_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RESERVED_MOUNTS = ("/tmp", "/dev/shm")  # the pods' own scratch volumes
RESERVED_VOLUMES = ("tmp", "shm")


@dataclass(frozen=True, kw_only=True)
class SharedVolume:
    """A volume mounted at the same path in the controller and in every Ray pod, so the
    dataset and checkpoint paths of a job spec mean the same on both sides."""

    name: str  # volume name inside the pod (DNS label)
    mount_path: str  # absolute path
    source: Mapping  # one Kubernetes volume source, e.g. {"persistentVolumeClaim": {...}}
    read_only: bool = False

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or self.name in RESERVED_VOLUMES:
            raise ValueError(f"volumes: name={self.name!r} must be a DNS label other than "
                             f"{', '.join(RESERVED_VOLUMES)}")
        if not self.mount_path.startswith("/") or self.mount_path.rstrip("/") in \
                RESERVED_MOUNTS:
            raise ValueError(f"volumes[{self.name}]: mount_path={self.mount_path!r} must be "
                             f"absolute and not one of {', '.join(RESERVED_MOUNTS)}")
        if not isinstance(self.source, Mapping) or len(self.source) != 1 or \
                not all(isinstance(v, Mapping) for v in self.source.values()):
            raise ValueError(f"volumes[{self.name}]: source={self.source!r} must hold exactly "
                             "one volume source (persistentVolumeClaim, nfs, hostPath, ...)")

    @classmethod
    def from_json(cls, item: Mapping) -> SharedVolume:
        """From the chart's form: {name, mountPath, readOnly, source}."""
        unknown = set(item) - {"name", "mountPath", "readOnly", "source"}
        if unknown:
            raise ValueError(f"volumes: unknown field(s) {sorted(unknown)}; valid: name, "
                             "mountPath, readOnly, source")
        return cls(name=str(item.get("name", "")), mount_path=str(item.get("mountPath", "")),
                   source=cast(Mapping, item.get("source")),  # checked by __post_init__
                   read_only=bool(item.get("readOnly", False)))


@dataclass(frozen=True, kw_only=True)
class WorkerGroupShape:
    """One KubeRay worker group: `replicas` identical pods of `ranks_per_pod` ranks."""

    name: str
    replicas: int
    ranks_per_pod: int
    memory_gib: int  # host memory requested per pod


@dataclass(frozen=True, kw_only=True)
class JobShape:
    """How a job's ranks map onto pods."""

    num_ranks: int
    uses_gpus: bool
    groups: tuple[WorkerGroupShape, ...]


def job_shape(job: JobRecord, settings: ClusterSettings) -> JobShape:
    """Pods for the job: one per node of its cluster spec, `gpus_per_node` ranks each."""
    res = job.spec.resources
    cluster = job.spec.resolve_cluster()
    per_node, num_ranks = cluster.gpus_per_node, res.num_ranks
    if num_ranks % per_node:  # the job spec guarantees whole nodes; say so if that changes
        raise ValueError(f"num_ranks={num_ranks} is not a multiple of gpus_per_node="
                         f"{per_node}; a RayCluster needs whole nodes")
    memory_gib = max(1, math.floor(cluster.host_memory_gib * settings.host_memory_fraction))
    group = WorkerGroupShape(name="ranks", replicas=num_ranks // per_node,
                             ranks_per_pod=per_node, memory_gib=memory_gib)
    uses_gpus = not (isinstance(res.cluster, str) and res.cluster in CPU_CLUSTER_PRESETS)
    return JobShape(num_ranks=num_ranks, uses_gpus=uses_gpus, groups=(group,))


def cluster_name(job_id: str, attempt: int) -> str:
    """`rm-<job>-a<attempt>`, shortened with a hash of the id when too long for KubeRay."""
    if attempt < 1:
        raise ValueError(f"attempt={attempt} must be >= 1")
    base = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-") or "job"
    suffix = f"-a{attempt}"
    name = f"rm-{base}{suffix}"
    if len(name) <= MAX_CLUSTER_NAME:
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    keep = MAX_CLUSTER_NAME - len("rm-") - len(digest) - 1 - len(suffix)
    return f"rm-{base[:keep].rstrip('-')}-{digest}{suffix}"


def owner_labels(settings: ClusterSettings, job_id: str, attempt: int, *,
                 job_name: str) -> dict[str, str]:
    """Labels on every object the launcher creates (the RayCluster, every pod of it):
    `kubectl get rayclusters,pods -l ringmaster.io/job-id=<id>` finds a job's objects."""
    for what, value in (("job_id", job_id), ("job_name", job_name)):
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"{what}={value!r} is not a valid label value")
    return {
        "app.kubernetes.io/part-of": "ringmaster",
        "app.kubernetes.io/managed-by": "ringmaster-controller",
        LABEL_OWNER: settings.owner,
        LABEL_JOB: job_id,
        LABEL_JOB_NAME: job_name,
        LABEL_ATTEMPT: str(attempt),
        LABEL_WORKER: "true",
    }


def owner_selector(settings: ClusterSettings, job_id: str | None = None) -> str:
    """Label selector for this controller's pods/clusters (optionally one job's)."""
    parts = [f"{LABEL_OWNER}={settings.owner}"]
    if job_id is not None:
        parts.append(f"{LABEL_JOB}={job_id}")
    return ",".join(parts)


def driver_entrypoint(job_id: str, attempt: int, controller_address: str) -> list[str]:
    """The command the head runs (same driver and flags as the Ray launcher)."""
    return ["python", "-m", "workers.driver", "--job", job_id, "--attempt", str(attempt),
            "--controller", controller_address]


def pod_env(settings: ClusterSettings, job_id: str, attempt: int) -> list[dict]:
    """Env of every Ray container: who the job is, where the controller is, OTEL_*."""
    env = {
        **settings.env,
        "RINGMASTER_JOB_ID": job_id,
        "RINGMASTER_ATTEMPT": str(attempt),
        "RINGMASTER_CONTROLLER": settings.controller_address,
        "OTEL_SERVICE_NAME": "ringmaster-worker",
        "HOME": "/tmp",  # the root filesystem is read-only; Ray and pip caches go here
        "PYTHONUNBUFFERED": "1",
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def worker_secret_name(job_id: str, attempt: int) -> str:
    """The per-attempt Secret holding the workers' gRPC secret."""
    return f"{cluster_name(job_id, attempt)}-worker"


def build_worker_secret(*, job_id: str, attempt: int, job_name: str, namespace: str,
                        settings: ClusterSettings, secret: str,
                        controller_ca: str | None = None) -> dict:
    """The Secret (API JSON form) the attempt's pods read their worker secret from."""
    data = {WORKER_SECRET_KEY: secret}
    if controller_ca:
        data[CONTROLLER_CA_KEY] = controller_ca
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": worker_secret_name(job_id, attempt), "namespace": namespace,
                         "labels": owner_labels(settings, job_id, attempt,
                                                job_name=job_name)},
            "stringData": data}


def _secret_env(secret_name: str, with_ca: bool) -> list[dict]:
    keys = [("RINGMASTER_WORKER_SECRET", WORKER_SECRET_KEY)]
    if with_ca:
        keys.append(("RINGMASTER_CONTROLLER_CA", CONTROLLER_CA_KEY))
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
            for name, key in keys]


def _security_context(settings: ClusterSettings) -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
           "runAsGroup": settings.run_as_user, "fsGroup": settings.run_as_user,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "privileged": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _pod_template(settings: ClusterSettings, *, labels: dict, container: dict,
                  image: str) -> dict:
    pod_sc, container_sc = _security_context(settings)
    mounts: list[dict[str, object]] = [{"name": "tmp", "mountPath": "/tmp"},
                                       {"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    for v in settings.volumes:
        mounts.append({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only})
        volumes.append({"name": v.name, **{k: dict(s) for k, s in v.source.items()}})
    container = {**container, "image": image, "imagePullPolicy": "IfNotPresent",
                 "securityContext": container_sc, "volumeMounts": mounts}
    spec = {
        "automountServiceAccountToken": False,  # Ray pods never call the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": pod_sc,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _worker_resources(settings: ClusterSettings, shape: JobShape, group: WorkerGroupShape,
                      pods: WorkerPodSettings) -> dict:
    amounts = {"cpu": str(group.ranks_per_pod * settings.cpus_per_rank),
               "memory": f"{group.memory_gib}Gi"}
    if shape.uses_gpus:
        amounts[settings.gpu_resource] = str(group.ranks_per_pod)
    # requests == limits unless the operator says otherwise: Guaranteed QoS, so a
    # training pod is the last to be evicted.
    return worker_resources(pods, amounts)


def _head_group(settings: ClusterSettings, labels: dict, env: list[dict],
                pods: WorkerPodSettings, image: str) -> dict:
    ports = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in HEAD_PORTS.items()]
    container = {"name": "ray-head", "env": env, "ports": ports,
                 "resources": {k: dict(v) for k, v in settings.head_resources.items()}}
    return {
        # num-cpus 0: no rank actor lands on the head; it only runs the driver.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": steer_head(_pod_template(settings, labels=labels, container=container,
                                             image=image), pods),
    }


def _worker_group(settings: ClusterSettings, shape: JobShape, group: WorkerGroupShape,
                  labels: dict, env: list[dict], pods: WorkerPodSettings, image: str) -> dict:
    params = {"num-cpus": str(group.ranks_per_pod * settings.cpus_per_rank)}
    if shape.uses_gpus:
        params["num-gpus"] = str(group.ranks_per_pod)
    container = {"name": "ray-worker", "env": env,
                 "resources": _worker_resources(settings, shape, group, pods)}
    return {
        "groupName": group.name,
        # A fixed size: the gang either exists whole or the attempt is lost.
        "replicas": group.replicas, "minReplicas": group.replicas,
        "maxReplicas": group.replicas,
        "rayStartParams": params,
        "template": steer_worker(_pod_template(settings, labels=labels, container=container,
                                               image=image), pods),
    }


def job_pods(job: JobRecord, settings: ClusterSettings) -> WorkerPodSettings:
    """The chart's pod settings with the job's `resources.kubernetes` over them."""
    return for_job(settings.workers, job.spec.resources.kubernetes)


def build_raycluster(*, job: JobRecord, attempt: int, namespace: str,
                     settings: ClusterSettings, worker_secret: str | None = None,
                     with_ca: bool = False) -> dict:
    """The RayCluster object (API JSON form) for `attempt` of `job` in `namespace`;
    `worker_secret` names the attempt's Secret (`with_ca`: it also holds the CA).

    With a Kueue queue (kueue.queueName or the job's queue_name) the cluster carries the
    queue label and is created suspended: Kueue admits its head and workers as one gang
    and lifts `spec.suspend`; until then KubeRay creates no pods.
    """
    shape = job_shape(job, settings)
    pods = job_pods(job, settings)
    overrides = job.spec.resources.kubernetes
    image = (overrides.image if overrides else None) or settings.image
    labels = owner_labels(settings, job.id, attempt, job_name=job.spec.name)
    env = pod_env(settings, job.id, attempt)
    if worker_secret:
        env += _secret_env(worker_secret, with_ca)
    cluster_labels = {**labels, **({LABEL_KUEUE_QUEUE: pods.queue_name}
                                   if pods.queue_name else {})}
    spec: dict[str, object] = {
        "rayVersion": settings.ray_version,
        "headGroupSpec": _head_group(settings, labels, env, pods, image),
        "workerGroupSpecs": [_worker_group(settings, shape, g, labels, env, pods, image)
                             for g in shape.groups],
    }
    if pods.queue_name:
        spec["suspend"] = True
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": cluster_name(job.id, attempt), "namespace": namespace,
                     "labels": cluster_labels,
                     "annotations": {"ringmaster.io/entrypoint":
                                     " ".join(driver_entrypoint(job.id, attempt,
                                                                settings.controller_address))}},
        "spec": spec,
    }


def is_suspended(obj: Mapping) -> bool:
    """A RayCluster still waiting for Kueue (or anyone) to lift `spec.suspend`."""
    return bool((obj.get("spec") or {}).get("suspend"))


def head_dashboard_url(name: str, namespace: str) -> str:
    """The Ray job API of a cluster's head (KubeRay's `<name>-head-svc` Service)."""
    return f"http://{name}-head-svc.{namespace}.svc:{HEAD_PORTS['dashboard']}"
