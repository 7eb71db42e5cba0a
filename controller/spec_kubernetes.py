"""`resources.kubernetes` of a job spec: per-job steering of its KubeRay worker pods.

The chart's `workers.*` values (docs/deploy.md) set what every RayCluster gets; a job spec
may override them for its own pods. Kubernetes objects inside (tolerations, affinity) are
written as in a pod spec, camelCase keys included, so they can be copied from the
Kubernetes documentation; they are checked here, at submit, field by field (an affinity
with a typo is a 422 naming the path, not a RayCluster the API server refuses four
attempts later). What needs the controller's own settings (which service accounts a job
may use, the GPU resource name) is checked by the launcher at submit too
(`Launcher.check_spec`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from scheduler.errors import SpecError

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_PATTERN = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LABEL_KEY_PATTERN = (rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
RESOURCE_NAME_PATTERN = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*" \
                        r"[A-Za-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RESERVED_ENV_PREFIX = "RINGMASTER_"  # the launcher's own variables (job, attempt, address)
RESERVED_ENV = frozenset({"HOME", "PYTHONUNBUFFERED", "OTEL_SERVICE_NAME"})

Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1,
                                                max_length=253)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN, max_length=317)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=63)]
ResourceName = Annotated[str, StringConstraints(pattern=RESOURCE_NAME_PATTERN, max_length=317)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN, max_length=256)]
ImageRef = Annotated[str, StringConstraints(pattern=r"^[^\s:@/][^\s]*$", max_length=1024)]


def env_name_problem(name: str) -> str | None:
    """Why `name` may not be set by a user (None when it may)."""
    if name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV:
        return (f"{name} is set by the launcher (reserved: {RESERVED_ENV_PREFIX}*, "
                f"{', '.join(sorted(RESERVED_ENV))})")
    return None


# Shapes of the Kubernetes objects a job may give: field -> kind ("str", "int", "strmap",
# a nested shape dict, or a one-item list of one of those for arrays); "!" marks required.
_REQUIREMENT = {"!key": "str", "!operator": "str", "values": ["str"]}
_NODE_TERM = {"matchExpressions": [_REQUIREMENT], "matchFields": [_REQUIREMENT]}
_SELECTOR = {"matchLabels": "strmap", "matchExpressions": [_REQUIREMENT]}
_POD_TERM = {"labelSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
             "namespaces": ["str"], "!topologyKey": "str", "matchLabelKeys": ["str"],
             "mismatchLabelKeys": ["str"]}
_POD_AFFINITY = {"requiredDuringSchedulingIgnoredDuringExecution": [_POD_TERM],
                 "preferredDuringSchedulingIgnoredDuringExecution": [
                     {"!weight": "int", "!podAffinityTerm": _POD_TERM}]}
AFFINITY_SHAPE = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"!nodeSelectorTerms": [_NODE_TERM]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"!weight": "int", "!preference": _NODE_TERM}]},
    "podAffinity": _POD_AFFINITY,
    "podAntiAffinity": _POD_AFFINITY,
}
TOLERATION_SHAPE = {"key": "str", "operator": "str", "value": "str", "effect": "str",
                    "tolerationSeconds": "int"}
NODE_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


def check_shape(value: Any, shape: Any, path: str) -> None:
    """Raise ValueError naming `path` where `value` does not have the Kubernetes `shape`."""
    where = path or "<root>"
    if isinstance(shape, list):
        if not isinstance(value, list):
            raise SpecError(f"{where}: must be a list (got {type(value).__name__})")
        for i, item in enumerate(value):
            check_shape(item, shape[0], f"{path}[{i}]")
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: must be an object (got {type(value).__name__})")
        fields = {k.lstrip("!"): v for k, v in shape.items()}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {unknown}; valid: {', '.join(fields)}")
        missing = [k[1:] for k in shape if k.startswith("!") and k[1:] not in value]
        if missing:
            raise SpecError(f"{where}: missing required field(s) {missing}")
        for k, v in value.items():
            check_shape(v, fields[k], f"{path}.{k}" if path else k)
    elif shape == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise SpecError(f"{where}: must be a map of strings")
    elif shape == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: must be an integer (got {value!r})")
    elif not isinstance(value, str):
        raise SpecError(f"{where}: must be a string (got {value!r})")


def _check_operators(affinity: dict, path: str) -> None:
    """Operators and weights the shape check cannot see."""
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            op = node.get("operator")
            if op is not None and "key" in node and op not in NODE_OPERATORS:
                raise SpecError(f"{where}.operator: {op!r} is not one of "
                                f"{', '.join(NODE_OPERATORS)}")
            w = node.get("weight")
            if isinstance(w, int) and not 1 <= w <= 100:
                raise SpecError(f"{where}.weight: {w} must be in 1..100")
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(affinity, path)


def check_toleration(t: dict, path: str) -> None:
    check_shape(t, TOLERATION_SHAPE, path)
    op = t.get("operator", "Equal")
    if op not in ("Exists", "Equal"):
        raise SpecError(f"{path}.operator: {op!r} must be Exists or Equal")
    if op == "Exists" and t.get("value"):
        raise SpecError(f"{path}.value: must be empty with operator Exists")
    if not t.get("key") and op != "Exists":
        raise SpecError(f"{path}.key: an empty key needs operator Exists (tolerates all)")
    if t.get("effect", "") not in TOLERATION_EFFECTS:
        raise SpecError(f"{path}.effect: {t['effect']!r} is not one of NoSchedule, "
                        "PreferNoSchedule, NoExecute (or empty: all)")
    if "tolerationSeconds" in t and t.get("effect") != "NoExecute":
        raise SpecError(f"{path}.tolerationSeconds: only applies to effect NoExecute")


def check_affinity(a: dict, path: str) -> None:
    check_shape(a, AFFINITY_SHAPE, path)
    _check_operators(a, path)


class WorkerResources(BaseModel):
    """Requests/limits of each worker container, merged over the launcher's computed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: dict[ResourceName, Quantity] = Field(default_factory=dict)
    limits: dict[ResourceName, Quantity] = Field(default_factory=dict)


class KubernetesOverrides(BaseModel):
    """Per-job overrides of the chart's `workers.*` values (kuberay launcher only).

    Maps (node_selector, extra_env, extra_resources, resources.requests/limits) merge key
    by key over the chart's; tolerations are added to the chart's; the others replace.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageRef | None = Field(
        default=None, description="Image of this job's head and worker pods (default: "
                                  "workers.image). Must hold the same Ringmaster version.")
    resources: WorkerResources | None = Field(
        default=None, description="Requests/limits per worker pod merged over the computed "
                                  "ones (cpu, memory, ephemeral-storage); GPUs follow "
                                  "gpus_per_node.")
    node_selector: dict[LabelKey, LabelValue] | None = Field(
        default=None, description="Node labels the worker pods require (merged over "
                                  "workers.nodeSelector).")
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, description="Tolerations added to workers.tolerations (Kubernetes "
                                  "form: key, operator, value, effect, tolerationSeconds).")
    affinity: dict[str, Any] | None = Field(
        default=None, description="Affinity of the worker pods (Kubernetes form), replaces "
                                  "workers.affinity.")
    priority_class_name: DnsSubdomain | None = Field(
        default=None, description="PriorityClass of every pod of the job (head included).")
    shm_size: Quantity | None = Field(
        default=None, description="Size of the memory-backed /dev/shm of each worker pod "
                                  "(counts against its memory limit).")
    extra_env: dict[EnvName, Annotated[str, StringConstraints(max_length=32768)]] | None = \
        Field(default=None, description="Environment of every Ray container, merged over "
                                        "workers.extraEnv (NCCL_*, cloud SDK settings).")
    extra_resources: dict[ResourceName, Annotated[int, Field(ge=0, le=1_000_000)]] | None = \
        Field(default=None, description="Extended resources per worker pod, e.g. rdma/ib: 1 "
                                        "(requests = limits), merged over "
                                        "workers.extraResources.")
    service_account_name: DnsSubdomain | None = Field(
        default=None, description="Service account of the job's pods; must be one the chart "
                                  "allows (workers.jobServiceAccounts).")
    queue_name: Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, min_length=1,
                                                 max_length=63)] | None = Field(
        default=None, description="Kueue LocalQueue of the job (default: kueue.queueName).")

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict] | None) -> list[dict] | None:
        for i, t in enumerate(value or []):
            check_toleration(t, f"[{i}]")
        return value

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, value: dict | None) -> dict | None:
        if value is not None:
            check_affinity(value, "")
        return value

    @field_validator("extra_env")
    @classmethod
    def _env(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if problem := env_name_problem(name):
                raise SpecError(f"extra_env: {problem}")
        return value

    @field_validator("extra_resources")
    @classmethod
    def _extended(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name in value or {}:
            if "/" not in name:
                raise SpecError(f"extra_resources: {name!r} is not an extended resource "
                                "(vendor/name, e.g. rdma/ib); set cpu/memory under resources")
        return value
