"""What a platform steers about the Ray pods of every job: placement, identity, NCCL's needs.

`WorkerPodSettings` is the chart's `workers.*` block (plus `kueue.queueName`), read from
the controller's environment; `for_job` merges a job's `resources.kubernetes` over it
(controller.spec_kubernetes) and raises a ValueError naming the field when the job asks
for something this controller does not allow; `steer_head`/`steer_worker` apply the
result to the pod templates controller.launchers.kuberay builds.

Placement (nodeSelector, tolerations, affinity), the memory-backed /dev/shm size, the
container resources and the extended resources (RDMA/InfiniBand device plugins) apply to
worker pods; image, service account, priority class and extra environment apply to the
head too (it runs the driver, which reads the dataset and joins the gang). Pure functions:
no API calls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from controller.spec_kubernetes import (
    DNS_SUBDOMAIN_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    QUANTITY_PATTERN,
    RESOURCE_NAME_PATTERN,
    KubernetesOverrides,
    check_affinity,
    check_toleration,
    env_name_problem,
)

SHM_MOUNT = "/dev/shm"
_SUFFIX = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "4Gi", 8) as a number."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(value))
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def _check(pattern: str, value: str, what: str) -> None:
    if not re.match(pattern, value):
        raise ValueError(f"{what}={value!r} is not valid")


@dataclass(frozen=True, kw_only=True)
class WorkerPodSettings:
    """The steerable parts of every Ray pod (the chart's workers.* values)."""

    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # requests/limits
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping, ...] = ()
    affinity: Mapping = field(default_factory=dict)
    priority_class_name: str = ""
    shm_size: str = ""  # "" : no size limit beyond the pod's memory limit
    extra_env: tuple[Mapping, ...] = ()  # EnvVar objects (value or valueFrom)
    extra_resources: Mapping[str, int] = field(default_factory=dict)  # per worker pod
    service_account_name: str = ""  # "" : the namespace's default account
    job_service_accounts: tuple[str, ...] = ()  # what resources.kubernetes may pick
    queue_name: str = ""  # Kueue LocalQueue; "" : no Kueue
    gpu_resource: str = "nvidia.com/gpu"  # counted per rank by the launcher, never here

    def __post_init__(self) -> None:
        self._check_resources()
        for k, v in self.node_selector.items():
            _check(LABEL_KEY_PATTERN, k, "workers.nodeSelector key")
            _check(LABEL_VALUE_PATTERN, str(v), f"workers.nodeSelector[{k}]")
        for i, t in enumerate(self.tolerations):
            check_toleration(dict(t), f"workers.tolerations[{i}]")
        if self.affinity:
            check_affinity(dict(self.affinity), "workers.affinity")
        for name, value in (("priorityClassName", self.priority_class_name),
                            ("serviceAccountName", self.service_account_name),
                            *(("jobServiceAccounts", a) for a in self.job_service_accounts)):
            if value:
                _check(DNS_SUBDOMAIN_PATTERN, value, f"workers.{name}")
        if self.shm_size:
            _check(QUANTITY_PATTERN, self.shm_size, "workers.shmSize")
        for e in self.extra_env:
            if not isinstance(e, Mapping) or not e.get("name"):
                raise ValueError(f"workers.extraEnv: {e!r} is not an EnvVar (name, value)")
            if problem := env_name_problem(str(e["name"])):
                raise ValueError(f"workers.extraEnv: {problem}")
        if self.queue_name:
            _check(LABEL_VALUE_PATTERN, self.queue_name, "kueue.queueName")

    def _check_resources(self) -> None:
        unknown = set(self.resources) - {"requests", "limits"}
        if unknown:
            raise ValueError(f"workers.resources: unknown key(s) {sorted(unknown)}; valid: "
                             "requests, limits")
        for part, amounts in self.resources.items():
            for name, amount in amounts.items():
                where = f"workers.resources.{part}.{name}"
                _check(RESOURCE_NAME_PATTERN, name, where)
                quantity(amount)
                if name == self.gpu_resource:
                    raise ValueError(f"{where}: GPUs are requested per rank from the job's "
                                     "gpus_per_node (workers.gpuResourceName names them)")
        for name, count in self.extra_resources.items():
            _check(RESOURCE_NAME_PATTERN, name, "workers.extraResources key")
            if "/" not in name or name == self.gpu_resource:
                raise ValueError(f"workers.extraResources: {name!r} must be an extended "
                                 "resource other than the GPU (e.g. rdma/ib)")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"workers.extraResources[{name}]={count!r} must be an "
                                 "integer >= 0")

    @classmethod
    def from_json(cls, obj: Mapping, *, queue_name: str = "",
                  gpu_resource: str = "nvidia.com/gpu") -> WorkerPodSettings:
        """From the chart's JSON form (RINGMASTER_K8S_WORKERS: camelCase keys)."""
        keys = {"resources": "resources", "nodeSelector": "node_selector",
                "tolerations": "tolerations", "affinity": "affinity",
                "priorityClassName": "priority_class_name", "shmSize": "shm_size",
                "extraEnv": "extra_env", "extraResources": "extra_resources",
                "serviceAccountName": "service_account_name",
                "jobServiceAccounts": "job_service_accounts"}
        unknown = set(obj) - set(keys)
        if unknown:
            raise ValueError(f"RINGMASTER_K8S_WORKERS: unknown key(s) {sorted(unknown)}; "
                             f"valid: {', '.join(keys)}")
        kw = {keys[k]: v for k, v in obj.items() if v is not None}
        for k in ("tolerations", "extra_env", "job_service_accounts"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw, queue_name=queue_name, gpu_resource=gpu_resource)


def _merge_env(base: tuple[Mapping, ...], job: Mapping[str, str]) -> tuple[Mapping, ...]:
    kept = [e for e in base if e["name"] not in job]
    return (*kept, *({"name": k, "value": v} for k, v in sorted(job.items())))


def _merged_resources(base: Mapping, job) -> dict:
    out = {p: dict(base.get(p, {})) for p in ("requests", "limits")}
    if job is not None:
        out["requests"].update(job.requests)
        out["limits"].update(job.limits)
    return {p: v for p, v in out.items() if v}


def for_job(pods: WorkerPodSettings, job: KubernetesOverrides | None) -> WorkerPodSettings:
    """The chart's settings with a job's `resources.kubernetes` merged over them."""
    if job is None:
        return pods
    where = "resources.kubernetes"
    sa = job.service_account_name
    if sa is not None and sa != pods.service_account_name and \
            sa not in pods.job_service_accounts:
        allowed = sorted({pods.service_account_name, *pods.job_service_accounts} - {""})
        raise ValueError(f"{where}.service_account_name={sa!r} is not allowed here; this "
                         f"controller allows: {', '.join(allowed) or 'none'} "
                         "(workers.jobServiceAccounts)")
    resources = _merged_resources(pods.resources, job.resources)
    if pods.gpu_resource in {*resources.get("requests", {}), *resources.get("limits", {})}:
        raise ValueError(f"{where}.resources: {pods.gpu_resource} is requested per rank from "
                         "gpus_per_node; leave it out")
    return replace(
        pods, resources=resources,
        node_selector={**pods.node_selector, **(job.node_selector or {})},
        tolerations=(*pods.tolerations, *(job.tolerations or ())),
        affinity=job.affinity if job.affinity is not None else pods.affinity,
        priority_class_name=job.priority_class_name or pods.priority_class_name,
        shm_size=job.shm_size or pods.shm_size,
        extra_env=_merge_env(pods.extra_env, job.extra_env or {}),
        extra_resources={**pods.extra_resources, **(job.extra_resources or {})},
        service_account_name=sa or pods.service_account_name,
        queue_name=job.queue_name or pods.queue_name)


def worker_resources(pods: WorkerPodSettings, computed: Mapping[str, str]) -> dict:
    """requests/limits of a worker container: the computed amounts, the operator's
    overrides over them, the extended resources (requests = limits, as Kubernetes wants)."""
    extended = {k: str(v) for k, v in pods.extra_resources.items()}
    out = {}
    for part in ("requests", "limits"):
        out[part] = {**computed, **pods.resources.get(part, {}), **extended}
    for name, req in out["requests"].items():
        lim = out["limits"].get(name)
        if lim is not None and quantity(req) > quantity(lim):
            raise ValueError(f"worker resources (workers.resources, then the job's "
                             f"resources.kubernetes.resources): requests.{name}={req} "
                             f"exceeds limits.{name}={lim}")
    return out


def _common(spec: dict, container: dict, pods: WorkerPodSettings) -> None:
    if pods.service_account_name:
        spec["serviceAccountName"] = pods.service_account_name
    if pods.priority_class_name:
        spec["priorityClassName"] = pods.priority_class_name
    if pods.extra_env:
        names = {e["name"] for e in pods.extra_env}
        container["env"] = [*(e for e in container["env"] if e["name"] not in names),
                            *(dict(e) for e in pods.extra_env)]


def steer_head(template: dict, pods: WorkerPodSettings) -> dict:
    """Identity, priority and environment of the head pod (it runs the driver)."""
    spec = template["spec"]
    _common(spec, spec["containers"][0], pods)
    return template


def steer_worker(template: dict, pods: WorkerPodSettings) -> dict:
    """Everything steerable on a worker pod template (modified in place and returned)."""
    spec = template["spec"]
    _common(spec, spec["containers"][0], pods)
    if pods.node_selector:
        spec["nodeSelector"] = dict(pods.node_selector)
    if pods.tolerations:
        spec["tolerations"] = [dict(t) for t in pods.tolerations]
    if pods.affinity:
        spec["affinity"] = dict(pods.affinity)
    if pods.shm_size:
        for v in spec["volumes"]:
            if v["name"] == "shm":
                v["emptyDir"] = {"medium": "Memory", "sizeLimit": pods.shm_size}
    return template
