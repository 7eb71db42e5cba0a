"""How a job's resources.kubernetes merges over the chart's workers.* (controller.launchers.
workerpods), and what the chart's own values may not say."""

from __future__ import annotations

import pytest

from controller.launchers.workerpods import WorkerPodSettings, for_job, quantity
from controller.spec_kubernetes import KubernetesOverrides

CHART = WorkerPodSettings(
    node_selector={"pool": "h100", "zone": "a"},
    tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    affinity={"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
    priority_class_name="training", shm_size="64Gi",
    extra_env=({"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "NCCL_IB_HCA", "value": "mlx5"}),
    extra_resources={"rdma/ib": 1}, service_account_name="workers",
    job_service_accounts=("research",), queue_name="team-a")


def test_no_overrides_is_the_chart():
    assert for_job(CHART, None) is CHART


def test_maps_merge_lists_add_scalars_replace():
    job = KubernetesOverrides(
        node_selector={"zone": "b"}, tolerations=[{"key": "spot", "operator": "Exists"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}},
        extra_env={"NCCL_DEBUG": "INFO"}, extra_resources={"rdma/ib": 2, "example.com/fpga": 1},
        priority_class_name="urgent", service_account_name="research", queue_name="team-b")
    out = for_job(CHART, job)
    assert out.node_selector == {"pool": "h100", "zone": "b"}
    assert [t["key"] for t in out.tolerations] == ["nvidia.com/gpu", "spot"]
    assert list(out.affinity) == ["nodeAffinity"]  # replaced as a whole
    assert [(e["name"], e["value"]) for e in out.extra_env] == [
        ("NCCL_IB_HCA", "mlx5"), ("NCCL_DEBUG", "INFO")]
    assert out.extra_resources == {"rdma/ib": 2, "example.com/fpga": 1}
    assert (out.priority_class_name, out.shm_size) == ("urgent", "64Gi")
    assert (out.service_account_name, out.queue_name) == ("research", "team-b")


def test_a_job_may_not_pick_any_service_account():
    with pytest.raises(ValueError, match=r"service_account_name='admin'.*allows: research, "
                                         r"workers"):
        for_job(CHART, KubernetesOverrides(service_account_name="admin"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(resources={"limits": {"nvidia.com/gpu": "8"}}), "gpus_per_node"),
    (dict(resources={"limit": {"cpu": "8"}}), "unknown key"),
    (dict(resources={"limits": {"cpu": "lots"}}), "quantity"),
    (dict(extra_resources={"memory": 1}), "extended resource"),
    (dict(extra_env=({"name": "RINGMASTER_JOB_ID", "value": "x"},)), "reserved"),
    (dict(tolerations=({"key": "a", "operator": "Exist"},)), "Exists or Equal"),
    (dict(affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 101, "preference": {}}]}}), "1..100"),
    (dict(shm_size="big"), "workers.shmSize"),
    (dict(queue_name="bad queue"), "kueue.queueName"),
])
def test_bad_chart_values_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkerPodSettings(**kwargs)


@pytest.mark.parametrize("text, value", [("500m", 0.5), ("4Gi", 4 * 2**30), (8, 8),
                                         ("1.5k", 1500), ("2", 2)])
def test_quantities(text, value):
    assert quantity(text) == value
