"""Test helpers for the Kubernetes launcher: jobs, recorded pod events, a fake API server.

`FakeKube` stands in for the `kubernetes` client's CustomObjectsApi, CoreV1Api,
CoordinationV1Api and DiscoveryV1Api (same method names and keyword arguments) over an
in-memory object store, and records every call as (api_group, resource, verb) so tests can
hold the launcher's and the leader election's real API usage against the chart's RBAC.
Leases and EndpointSlices get resourceVersions and the API server's optimistic
concurrency: a write carrying a stale resourceVersion is a 409. `FakeWatch` replays
scripted pod events like `kubernetes.watch.Watch().stream`. `FakeRayJobs` is the Ray job
API of a head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from controller.launchers.kuberay import ClusterSettings
from controller.launchers.kubernetes import KubernetesLauncherConfig
from controller.spec import parse_job_spec
from controller.states import JobRecord, State

FIXTURES = Path(__file__).parent / "fixtures" / "pod_events"
NS = "ringmaster-jobs"


def launcher_config(**kw) -> KubernetesLauncherConfig:
    """Two namespaces, a 600 s readiness timeout, no wait between checks (tests step time)."""
    settings = ClusterSettings(image="registry.example.com/ringmaster-worker:0.1.0-cuda12.8",
                               ray_version="2.60.0", owner="rm-ringmaster",
                               controller_address="rm-ringmaster.ml.svc:50051")
    return KubernetesLauncherConfig(namespaces=(NS, "ringmaster-batch"), cluster=settings,
                                    ready_timeout_s=600, check_interval_s=0.0, **kw)


def make_job(*, num_ranks: int, cluster="h100", gpus_per_node: int | None = None,
             job_id: str = "tiny-run-3f9a0c1b2d") -> JobRecord:
    resources = {"num_ranks": num_ranks, "cluster": cluster}
    if gpus_per_node is not None:
        resources["gpus_per_node"] = gpus_per_node
    spec = parse_job_spec({"name": "tiny-run", "model": "tiny",
                           "dataset": {"path": "/data/tokens"}, "resources": resources,
                           "training": {"steps": 10, "global_batch_tokens": 4096}})
    return JobRecord(id=job_id, spec=spec, state=State.SCHEDULING, attempt=1)


def with_overrides(job: JobRecord, **kubernetes) -> JobRecord:
    """The job with `resources.kubernetes` set (validated like a submitted spec)."""
    data = job.spec.model_dump(mode="json")
    data["resources"]["kubernetes"] = kubernetes
    return dataclasses.replace(job, spec=parse_job_spec(data))


def recorded(name: str) -> list[dict]:
    """The watch events of one fixture: [{"type": ..., "object": pod}, ...]."""
    return json.loads((FIXTURES / f"{name}.json").read_text())["events"]


def _not_found(what: str) -> ApiException:
    exc = ApiException(status=404, reason="Not Found")
    exc.body = json.dumps({"kind": "Status", "reason": "NotFound", "message": what})
    return exc


def _conflict(what: str) -> ApiException:
    exc = ApiException(status=409, reason="Conflict")
    exc.body = json.dumps({"kind": "Status", "reason": "Conflict", "message": what})
    return exc


def _matches(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    wanted = dict(p.split("=", 1) for p in selector.split(",") if p)
    return all(labels.get(k) == v for k, v in wanted.items())


class FakeKube:
    """CustomObjectsApi + CoreV1Api over dicts; `calls` records (group, resource, verb)."""

    def __init__(self):
        self.clusters: dict[tuple[str, str], dict] = {}  # (namespace, name) -> RayCluster
        self.pods: dict[tuple[str, str], dict] = {}
        self.secrets: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.deleting: set[tuple[str, str]] = set()  # deleted, still finalizing
        self.resource_version = 100
        self.created: list[dict] = []  # every object created, in order (any kind)
        self.leases: dict[tuple[str, str], dict] = {}
        self.slices: dict[tuple[str, str], dict] = {}
        self.refuse: dict[str, ApiException] = {}  # verb/kind -> error raised instead
        self.down = False  # every call raises a connection error (API server away)

    def _call(self, group: str, resource: str, verb: str) -> None:
        self.calls.append((group, resource, verb))
        if self.down:
            raise ConnectionError("API server unreachable")
        if f"{verb} {resource}" in self.refuse:
            raise self.refuse[f"{verb} {resource}"]

    # CustomObjectsApi ---------------------------------------------------------------------
    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        self._call(group, plural, "create")
        key = (namespace, body["metadata"]["name"])
        if key in self.clusters:
            raise ApiException(status=409, reason="Conflict")
        self.clusters[key] = json.loads(json.dumps(body))
        self.created.append(self.clusters[key])
        return self.clusters[key]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self._call(group, plural, "get")
        if (namespace, name) not in self.clusters:
            raise _not_found(f"{plural} {name!r} not found")
        return self.clusters[(namespace, name)]

    def list_namespaced_custom_object(self, group, version, namespace, plural,
                                      label_selector="", **kw):
        self._call(group, plural, "list")
        items = [c for (ns, _), c in self.clusters.items()
                 if ns == namespace and _matches(c, label_selector)]
        return {"items": items, "metadata": {"resourceVersion": str(self.resource_version)}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self._call(group, plural, "delete")
        if (namespace, name) not in self.clusters:
            raise _not_found(f"{plural} {name!r} not found")
        self.deleting.add((namespace, name))
        return {"kind": "Status", "status": "Success"}

    # CoreV1Api --------------------------------------------------------------------------
    def list_namespaced_pod(self, namespace, label_selector="", watch=False, **kw):
        self._call("", "pods", "watch" if watch else "list")
        items = [p for (ns, _), p in self.pods.items()
                 if ns == namespace and _matches(p, label_selector)]
        return {"items": items, "metadata": {"resourceVersion": str(self.resource_version)}}

    # CoordinationV1Api and DiscoveryV1Api: versioned objects ------------------------------
    def _read(self, store, group, resource, name, namespace):
        self._call(group, resource, "get")
        if (namespace, name) not in store:
            raise _not_found(f"{resource} {name!r} not found")
        return json.loads(json.dumps(store[(namespace, name)]))

    def _create(self, store, group, resource, namespace, body):
        self._call(group, resource, "create")
        key = (namespace, body["metadata"]["name"])
        if key in store:
            raise _conflict(f"{resource} {key[1]!r} already exists")
        self.resource_version += 1
        obj = json.loads(json.dumps(body))
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        store[key] = obj
        self.created.append(obj)
        return obj

    def _replace(self, store, group, resource, name, namespace, body):
        self._call(group, resource, "update")
        key = (namespace, name)
        if key not in store:
            raise _not_found(f"{resource} {name!r} not found")
        if body["metadata"].get("resourceVersion") != store[key]["metadata"]["resourceVersion"]:
            raise _conflict("the object has been modified; please apply your changes to "
                            "the latest version")
        self.resource_version += 1
        obj = json.loads(json.dumps(body))
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        store[key] = obj
        return obj

    def read_namespaced_lease(self, name, namespace, **kw):
        return self._read(self.leases, "coordination.k8s.io", "leases", name, namespace)

    def create_namespaced_lease(self, namespace, body, **kw):
        return self._create(self.leases, "coordination.k8s.io", "leases", namespace, body)

    def replace_namespaced_lease(self, name, namespace, body, **kw):
        return self._replace(self.leases, "coordination.k8s.io", "leases", name, namespace,
                             body)

    def read_namespaced_endpoint_slice(self, name, namespace, **kw):
        return self._read(self.slices, "discovery.k8s.io", "endpointslices", name, namespace)

    def create_namespaced_endpoint_slice(self, namespace, body, **kw):
        return self._create(self.slices, "discovery.k8s.io", "endpointslices", namespace,
                            body)

    def replace_namespaced_endpoint_slice(self, name, namespace, body, **kw):
        return self._replace(self.slices, "discovery.k8s.io", "endpointslices", name,
                             namespace, body)

    def create_namespaced_secret(self, namespace, body, **kw):
        self.calls.append(("", "secrets", "create"))
        key = (namespace, body["metadata"]["name"])
        if key in self.secrets:
            raise ApiException(status=409, reason="Conflict")
        self.secrets[key] = json.loads(json.dumps(body))
        return self.secrets[key]

    def delete_namespaced_secret(self, name, namespace, **kw):
        self.calls.append(("", "secrets", "delete"))
        if self.secrets.pop((namespace, name), None) is None:
            raise _not_found(f"secrets {name!r} not found")
        return {"kind": "Status", "status": "Success"}

    # test controls ------------------------------------------------------------------------
    def set_state(self, namespace: str, name: str, state: str) -> None:
        self.clusters[(namespace, name)]["status"] = {"state": state}

    def kueue_admits(self, namespace: str, name: str) -> None:
        """What Kueue does when it admits a RayCluster's gang: lift spec.suspend."""
        self.clusters[(namespace, name)]["spec"]["suspend"] = False

    def finish_deletes(self) -> None:
        """The API server's garbage collector finishes every pending deletion."""
        for key in self.deleting:
            self.clusters.pop(key, None)
        self.deleting.clear()


class FakeWatch:
    """Replays `script` (list of events) per stream call, like kubernetes.watch.Watch."""

    def __init__(self, script: list[dict] | None = None):
        self.script = list(script or [])
        self.stopped = False
        self.kwargs: list[dict] = []

    def stream(self, func, **kwargs):
        self.kwargs.append(kwargs)
        func(watch=True, **{k: v for k, v in kwargs.items() if k != "timeout_seconds"})
        events, self.script = self.script, []
        yield from events

    def stop(self):
        self.stopped = True


class FakeRayJobs:
    """The Ray job API of every head: submissions by address, statuses set by tests."""

    def __init__(self):
        self.submitted: dict[str, dict] = {}  # submission_id -> submit_job kwargs + address
        self.status: dict[str, tuple[str, int | None, str]] = {}  # id -> (status, code, msg)
        self.fail_next_get = False
        self.hang = None  # a threading.Event: get_job_info blocks until it is set

    def __call__(self, address: str) -> FakeRayJobs._Client:
        return FakeRayJobs._Client(self, address)

    class _Client:
        def __init__(self, jobs: FakeRayJobs, address: str):
            self.jobs, self.address = jobs, address

        def submit_job(self, *, entrypoint, submission_id, runtime_env=None, metadata=None):
            if submission_id in self.jobs.submitted:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists")
            self.jobs.submitted[submission_id] = dict(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                address=self.address)
            self.jobs.status[submission_id] = ("RUNNING", None, "")
            return submission_id

        def get_job_info(self, submission_id):
            if self.jobs.hang is not None:
                self.jobs.hang.wait(10)
            if self.jobs.fail_next_get:
                self.jobs.fail_next_get = False
                raise ConnectionError("head unreachable")
            status, code, message = self.jobs.status[submission_id]
            return type("JobDetails", (), {"status": status, "driver_exit_code": code,
                                           "message": message})()
