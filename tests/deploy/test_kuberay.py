"""RayCluster objects the Kubernetes launcher would create (built, not applied).

Expected figures are worked out by hand from the presets in scheduler/specs.py (h100: 8
GPUs and 2048 GiB host memory per node; cpu: 4 ranks and 12 GiB per node), not by
calling the builder's helpers. The pod templates are also checked against Kubernetes'
own PodTemplate schema (kubernetes-validate, strict).
"""

from __future__ import annotations

import pytest
from kubernetes_validate import validate

from controller.launchers.kuberay import (
    LAUNCHER_RBAC_RULES,
    ClusterSettings,
    SharedVolume,
    build_raycluster,
    cluster_name,
    driver_entrypoint,
    head_dashboard_url,
)
from tests.deploy.kube_fakes import make_job

SETTINGS = ClusterSettings(image="registry.example.com/ringmaster-worker:0.1.0-cuda12.8",
                           ray_version="2.60.0", controller_address="rm-ringmaster.ml.svc:50051",
                           owner="rm-ringmaster",
                           env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317",
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
JOB_ID = "tiny-run-3f9a0c1b2d"


def _build(job, attempt=1, settings=SETTINGS):
    return build_raycluster(job=job, attempt=attempt, namespace="ringmaster-jobs",
                            settings=settings)


def _containers(rc):
    yield rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in rc["spec"]["workerGroupSpecs"]:
        yield g["template"]["spec"]["containers"][0]


def test_sixteen_h100_ranks_are_two_full_nodes():
    rc = _build(make_job(num_ranks=16, cluster="h100"))
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    res = group["template"]["spec"]["containers"][0]["resources"]
    # 8 GPUs, 8 x 8 CPUs, floor(2048 GiB x 0.85) = 1740 GiB; requests == limits.
    assert res["limits"] == {"nvidia.com/gpu": "8", "cpu": "64", "memory": "1740Gi"}
    assert res["requests"] == res["limits"]
    assert group["rayStartParams"] == {"num-gpus": "8", "num-cpus": "64"}


@pytest.mark.parametrize("num_ranks, gpus_per_node, pods, gpus", [
    (9, 3, 3, 3),  # odd node width, set in the job spec
    (5, None, 1, 5),  # fewer ranks than the preset's 8 per node: one 5-GPU pod
    (1, None, 1, 1),
])
def test_odd_shapes_map_ranks_onto_whole_pods(num_ranks, gpus_per_node, pods, gpus):
    rc = _build(make_job(num_ranks=num_ranks, cluster="h100", gpus_per_node=gpus_per_node))
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["replicas"] == pods
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(gpus) and limits["cpu"] == str(8 * gpus)
    assert pods * gpus == num_ranks


def test_cpu_preset_requests_no_gpus():
    rc = _build(make_job(num_ranks=3, cluster="cpu"))
    (group,) = rc["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    # 3 ranks < 4 per node: one pod of 3 ranks, floor(12 x 0.85) = 10 GiB.
    assert limits == {"cpu": "24", "memory": "10Gi"}
    assert "num-gpus" not in group["rayStartParams"]


def test_image_version_and_head():
    rc = _build(make_job(num_ranks=8))
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == "2.60.0"
    assert {c["image"] for c in _containers(rc)} == {SETTINGS.image}
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # ranks never land on the head
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    # KubeRay builds the head Service from these names (its defaults: gcs-server, dashboard,
    # client); the launcher submits the driver to the dashboard port.
    assert {p["name"]: p["containerPort"] for p in head_c["ports"]} == \
        {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def test_env_names_job_attempt_controller_and_otel():
    rc = _build(make_job(num_ranks=8), attempt=3)
    for c in _containers(rc):
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["RINGMASTER_JOB_ID"] == JOB_ID
        assert env["RINGMASTER_ATTEMPT"] == "3"
        assert env["RINGMASTER_CONTROLLER"] == "rm-ringmaster.ml.svc:50051"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
        assert env["OTEL_SERVICE_NAME"] == "ringmaster-worker"


def test_owner_labels_on_cluster_and_every_pod():
    rc = _build(make_job(num_ranks=16), attempt=2)
    expected = {"ringmaster.io/owner": "rm-ringmaster", "ringmaster.io/job-id": JOB_ID,
                "ringmaster.io/attempt": "2", "ringmaster.io/worker": "true",
                "app.kubernetes.io/part-of": "ringmaster"}
    assert expected.items() <= rc["metadata"]["labels"].items()
    templates = [rc["spec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in rc["spec"]["workerGroupSpecs"])]
    for t in templates:
        assert expected.items() <= t["metadata"]["labels"].items()


def test_pods_are_locked_down_and_valid_pod_templates():
    rc = _build(make_job(num_ranks=16))
    templates = [rc["spec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in rc["spec"]["workerGroupSpecs"])]
    for t in templates:
        spec = t["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = spec["containers"][0]["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
        validate({"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": "check", "namespace": "ringmaster-jobs"},
                  "template": t}, "1.35.0", strict=True)


def test_shared_volumes_reach_every_pod():
    import dataclasses

    volumes = (SharedVolume(name="datasets", mount_path="/data", read_only=True,
                            source={"persistentVolumeClaim": {"claimName": "ds"}}),
               SharedVolume(name="ckpt", mount_path="/checkpoints",
                            source={"nfs": {"server": "nfs", "path": "/x"}}))
    settings = dataclasses.replace(SETTINGS, volumes=volumes, image_pull_secrets=("reg",))
    rc = _build(make_job(num_ranks=16), settings=settings)
    templates = [rc["spec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in rc["spec"]["workerGroupSpecs"])]
    for t in templates:
        spec = t["spec"]
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/data"] == {"name": "datasets", "mountPath": "/data", "readOnly": True}
        assert mounts["/checkpoints"]["readOnly"] is False  # workers write checkpoints
        assert {v["name"]: v for v in spec["volumes"]}["datasets"] == \
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "ds"}}
        assert spec["imagePullSecrets"] == [{"name": "reg"}]
        validate({"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": "check", "namespace": "ringmaster-jobs"},
                  "template": t}, "1.35.0", strict=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="tmp", mount_path="/d", source={"emptyDir": {}}), "name='tmp'"),
    (dict(name="d", mount_path="/dev/shm", source={"emptyDir": {}}), "mount_path='/dev/shm'"),
    (dict(name="d", mount_path="rel", source={"emptyDir": {}}), "mount_path='rel'"),
    (dict(name="d", mount_path="/d", source={}), "exactly one volume source"),
    (dict(name="d", mount_path="/d", source={"nfs": "server:/x"}), "exactly one volume source"),
])
def test_bad_shared_volumes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharedVolume(**kwargs)


def test_shared_volume_from_the_charts_json():
    v = SharedVolume.from_json({"name": "d", "mountPath": "/d", "readOnly": True,
                                "source": {"hostPath": {"path": "/mnt"}}})
    assert (v.name, v.mount_path, v.read_only) == ("d", "/d", True)
    with pytest.raises(ValueError, match="unknown field"):
        SharedVolume.from_json({"name": "d", "mountPath": "/d", "source": {}, "mode": "rw"})
    with pytest.raises(ValueError, match="must be unique"):
        ClusterSettings(image="i:1", ray_version="2", controller_address="c:1", owner="o",
                        volumes=(v, v))


def test_entrypoint_matches_the_ray_launchers_driver():
    assert driver_entrypoint(JOB_ID, 4, "c:1") == [
        "python", "-m", "workers.driver", "--job", JOB_ID, "--attempt", "4", "--controller", "c:1"]
    rc = _build(make_job(num_ranks=8), attempt=4)
    assert rc["metadata"]["annotations"]["ringmaster.io/entrypoint"] == \
        f"python -m workers.driver --job {JOB_ID} --attempt 4 --controller " \
        "rm-ringmaster.ml.svc:50051"


@pytest.mark.parametrize("job_id, attempt", [
    ("a", 1), (JOB_ID, 12), ("x" * 48 + "-0123456789", 999), ("Upper_Case.id-ff", 1)])
def test_cluster_names_are_short_dns_labels(job_id, attempt):
    import re

    name = cluster_name(job_id, attempt)
    assert len(name) <= 40 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert name.endswith(f"-a{attempt}")
    assert cluster_name(job_id, attempt) == name  # deterministic: a restart finds it again
    assert cluster_name(job_id, attempt + 1) != name


def test_long_ids_differing_only_at_the_end_get_different_names():
    a, b = "x" * 48 + "-0123456789", "x" * 48 + "-0123456788"
    assert cluster_name(a, 1) != cluster_name(b, 1)


@pytest.mark.parametrize("field, value, message", [
    ("controller_address", "rm-ringmaster", "host:port"),
    ("owner", "bad owner!", "owner="),
    ("cpus_per_rank", 0, "cpus_per_rank=0"),
    ("host_memory_fraction", 1.5, "host_memory_fraction=1.5"),
    ("image", "", "image="),
])
def test_settings_name_the_bad_field(field, value, message):
    kwargs = dict(image="i:1", ray_version="2.60.0", controller_address="c:1", owner="o")
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        ClusterSettings(**kwargs)


def test_attempt_zero_is_refused():
    with pytest.raises(ValueError, match="attempt=0"):
        cluster_name(JOB_ID, 0)


def test_rbac_rules_and_dashboard_address():
    assert {(r.api_group, r.resource) for r in LAUNCHER_RBAC_RULES} == \
        {("ray.io", "rayclusters"), ("", "pods"), ("", "secrets")}
    assert head_dashboard_url("rm-x-a1", "jobs") == "http://rm-x-a1-head-svc.jobs.svc:8265"
