"""How this controller's jobs run on Kubernetes: `KubernetesLauncherConfig`, read from the
RINGMASTER_K8S_* variables the Helm chart sets (docs/deploy.md), and `check_job_spec`,
the submit-time check of a spec against it.

Pure: no API call, no client library; the controller's standby replicas use it to check
submissions without building a launcher. Every bad variable raises ValueError naming it
and its value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from controller.launchers.kuberay import ClusterSettings, SharedVolume, build_raycluster
from controller.launchers.workerpods import WorkerPodSettings
from controller.spec import JobCreate
from controller.states import JobRecord, State
from scheduler.errors import SpecError

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "127.0.0.1", "localhost", "")
FORWARDED_OTEL_SKIP = ("OTEL_SERVICE_NAME",)  # workers name themselves

__all__ = ["KubernetesLauncherConfig", "check_job_spec"]


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

