"""The RayClusters the launcher builds against KubeRay's v1 RayCluster API.

The schema is tests/deploy/raycluster_schema.py (written from KubeRay's v1 API reference,
every object closed so that a misspelt or misplaced field fails); the pod templates inside
are checked against Kubernetes' own PodTemplate schema (kubernetes-validate, strict), so
`crd_errors` reports both.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jsonschema
import pytest
from kubernetes_validate import validate as k8s_validate
from kubernetes_validate.utils import ValidationError as K8sValidationError

from controller.launchers.kuberay import ClusterSettings, SharedVolume, build_raycluster
from controller.launchers.workerpods import WorkerPodSettings
from tests.deploy.kube_fakes import make_job, with_overrides
from tests.deploy.raycluster_schema import RAYCLUSTER_V1

NS = "ringmaster-jobs"
SETTINGS = ClusterSettings(image="registry.example.com/ringmaster-worker:0.1.0-cuda12.8",
                           ray_version="2.60.0", controller_address="rm-ringmaster.ml.svc:50051",
                           owner="rm-ringmaster")

STEERED = WorkerPodSettings(
    resources={"requests": {"cpu": "96", "memory": "1600Gi", "ephemeral-storage": "200Gi"},
               "limits": {"cpu": "96", "memory": "1800Gi", "ephemeral-storage": "400Gi"}},
    node_selector={"node.kubernetes.io/instance-type": "p5.48xlarge",
                   "topology.kubernetes.io/zone": "us-east-1a"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                 {"key": "dedicated", "operator": "Equal", "value": "training",
                  "effect": "NoExecute", "tolerationSeconds": 3600}),
    affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                  "nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "nvidia.com/gpu.product", "operator": "In",
                       "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}},
              "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                  {"weight": 100, "podAffinityTerm": {
                      "topologyKey": "kubernetes.io/hostname",
                      "labelSelector": {"matchLabels": {"ringmaster.io/worker": "true"}}}}]}},
    priority_class_name="training-high",
    shm_size="256Gi",
    extra_env=({"name": "NCCL_IB_HCA", "value": "mlx5"},
               {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
               {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}),
    extra_resources={"rdma/ib": 8, "vpc.amazonaws.com/efa": 32},
    service_account_name="ringmaster-worker",
    queue_name="gpu-team-a",
)


@functools.cache
def _validator() -> jsonschema.Validator:
    jsonschema.Draft7Validator.check_schema(RAYCLUSTER_V1)
    return jsonschema.Draft7Validator(RAYCLUSTER_V1)


def _templates(rc: dict) -> list[tuple[str, dict]]:
    spec = rc.get("spec", {})
    out = [("spec.headGroupSpec.template", spec.get("headGroupSpec", {}).get("template"))]
    out += [(f"spec.workerGroupSpecs.{i}.template", g.get("template"))
            for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    return [(where, t) for where, t in out if isinstance(t, dict)]


def _pod_template_errors(rc: dict) -> list[str]:
    errors = []
    for where, t in _templates(rc):
        try:
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": "check", "namespace": NS}, "template": t},
                         "1.35.0", strict=True)
        except K8sValidationError as exc:
            errors.append(f"{where}: {exc.message}")
    return errors


def crd_errors(obj: dict) -> list[str]:
    """Every way `obj` breaks the RayCluster schema or its pod templates Kubernetes'."""
    errors = sorted(_validator().iter_errors(obj), key=lambda e: list(e.path))
    return [f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors] + \
        _pod_template_errors(obj)


def test_the_schema_lists_the_spec_fields_the_launcher_relies_on():
    spec = RAYCLUSTER_V1["properties"]["spec"]
    assert {"headGroupSpec", "workerGroupSpecs", "suspend", "rayVersion"} <= \
        spec["properties"].keys()
    assert spec["required"] == ["headGroupSpec"]


@pytest.mark.parametrize("num_ranks, cluster", [(16, "h100"), (5, "h100"), (3, "cpu")])
def test_default_rayclusters_validate(num_ranks, cluster):
    rc = build_raycluster(job=make_job(num_ranks=num_ranks, cluster=cluster), attempt=1,
                          namespace=NS, settings=SETTINGS)
    assert crd_errors(rc) == []


def _steered_job():
    job = make_job(num_ranks=16, cluster="h100")
    overrides = {"node_selector": {"ringmaster.io/pool": "a"},
                 "tolerations": [{"key": "spot", "operator": "Exists"}],
                 "extra_env": {"NCCL_DEBUG": "INFO"}, "extra_resources": {"rdma/ib": 4},
                 "priority_class_name": "training-urgent", "shm_size": "128Gi"}
    return with_overrides(job, **overrides)


def test_fully_steered_gpu_raycluster_validates():
    volumes = (SharedVolume(name="datasets", mount_path="/data", read_only=True,
                            source={"persistentVolumeClaim": {"claimName": "ds"}}),)
    settings = dataclasses.replace(SETTINGS, workers=STEERED, volumes=volumes,
                                   image_pull_secrets=("registry",),
                                   env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"})
    rc = build_raycluster(job=_steered_job(), attempt=2, namespace=NS, settings=settings)
    assert crd_errors(rc) == []
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge",
                                      "topology.kubernetes.io/zone": "us-east-1a",
                                      "ringmaster.io/pool": "a"}  # the job's key added
    assert [t["key"] for t in worker["tolerations"]] == ["nvidia.com/gpu", "dedicated", "spot"]
    assert worker["priorityClassName"] == "training-urgent"  # the job's replaces the chart's
    shm = {v["name"]: v for v in worker["volumes"]}["shm"]
    assert shm == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}}
    res = worker["containers"][0]["resources"]
    # Computed GPUs (8 per pod), the operator's cpu/memory, extended resources on both sides
    # (rdma/ib from the job: 4 over the chart's 8).
    assert res["limits"] == {"cpu": "96", "memory": "1800Gi", "ephemeral-storage": "400Gi",
                             "nvidia.com/gpu": "8", "rdma/ib": "4",
                             "vpc.amazonaws.com/efa": "32"}
    assert res["requests"]["memory"] == "1600Gi" and res["requests"]["rdma/ib"] == "4"
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["NCCL_IB_HCA"]["value"] == "mlx5" and env["NCCL_DEBUG"]["value"] == "INFO"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert env["RINGMASTER_ATTEMPT"]["value"] == "2"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == worker["serviceAccountName"] == "ringmaster-worker"
    assert head["priorityClassName"] == "training-urgent"
    assert "nodeSelector" not in head and "tolerations" not in head  # no GPU on the head
    assert rc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert rc["spec"]["suspend"] is True


@pytest.mark.parametrize("breakage", [
    lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replica=2),  # misspelt field
    lambda rc: rc["spec"]["workerGroupSpecs"][0].update(replicas="2"),  # wrong type
    lambda rc: rc["spec"]["workerGroupSpecs"][0].pop("groupName"),  # required field
    lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"].update(nodeselector={}),
    lambda rc: rc["spec"].update(suspend="yes"),
])
def test_the_schema_check_catches_a_broken_object(breakage):
    rc = build_raycluster(job=make_job(num_ranks=8), attempt=1, namespace=NS,
                          settings=SETTINGS)
    broken = copy.deepcopy(rc)
    breakage(broken)
    assert crd_errors(rc) == [] and crd_errors(broken) != []
