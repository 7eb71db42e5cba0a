"""KubernetesLauncher against a fake API server, a fake Ray job API and recorded pod events."""

from __future__ import annotations

import pytest

from controller.launchers import make_launcher
from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.kuberay import LAUNCHER_RBAC_RULES
from controller.launchers.kubernetes import KubernetesLauncher, KubernetesLauncherConfig
from tests.deploy.kube_fakes import (
    NS,
    FakeKube,
    FakeRayJobs,
    FakeWatch,
    launcher_config,
    make_job,
    recorded,
)

JOB_ID = "tiny-run-3f9a0c1b2d"
NAME = f"rm-{JOB_ID}-a1"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world():
    kube, jobs, clock = FakeKube(), FakeRayJobs(), Clock()
    watch = FakeWatch()

    def launcher(**kw):
        return KubernetesLauncher(config=launcher_config(**kw), custom_api=kube, core_api=kube,
                                  ray_jobs=jobs, watch_factory=lambda: watch, clock=clock,
                                  watch=False, worker_secret=lambda job, a: f"s-{job}-{a}")

    return dict(kube=kube, jobs=jobs, clock=clock, watch=watch, launcher=launcher)


def _kinds(events):
    return [(e.kind, e.attempt) for e in events]


def _start_running(world, job=None, attempt=1):
    la = world["launcher"]()
    job = job or make_job(num_ranks=16)
    la.start(job, attempt)
    world["kube"].set_state(NS, f"rm-{job.id}-a{attempt}", "ready")
    assert la.poll() == []
    return la


def test_lifecycle_create_ready_submit_complete_delete(world):
    kube, jobs = world["kube"], world["jobs"]
    la = world["launcher"]()
    la.start(make_job(num_ranks=16), 1)
    created = kube.clusters[(NS, NAME)]
    assert created["spec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert la.poll() == [] and jobs.submitted == {}  # not ready: nothing submitted yet
    kube.set_state(NS, NAME, "ready")
    assert la.poll() == []
    sub = jobs.submitted[f"{NAME}-driver"]
    assert sub["address"] == f"http://{NAME}-head-svc.{NS}.svc:8265"
    assert sub["entrypoint"] == (f"python -m workers.driver --job {JOB_ID} --attempt 1 "
                                 "--controller rm-ringmaster.ml.svc:50051")
    la.report(LauncherEvent(job_id=JOB_ID, attempt=1, kind=EventKind.READY))
    assert _kinds(la.poll()) == [(EventKind.READY, 1)]
    jobs.status[f"{NAME}-driver"] = ("SUCCEEDED", 0, "done")
    assert _kinds(la.poll()) == [(EventKind.COMPLETED, 1)]
    assert (NS, NAME) in kube.deleting  # the GPUs go back as soon as the job is over
    assert la.poll() == []  # still finalizing
    kube.finish_deletes()
    assert _kinds(la.poll()) == [(EventKind.STOPPED, 1)]
    assert la.poll() == []


def test_ready_condition_of_newer_kuberay_counts(world):
    la = world["launcher"]()
    la.start(make_job(num_ranks=8), 1)
    world["kube"].clusters[(NS, NAME)]["status"] = {
        "conditions": [{"type": "RayClusterProvisioned", "status": "True"}]}
    la.poll()
    assert f"{NAME}-driver" in world["jobs"].submitted


@pytest.mark.parametrize("status, code, kind", [
    ("FAILED", 3, EventKind.FAILED),  # the driver says a restart will not help
    ("FAILED", 1, EventKind.WORKER_LOST),
    ("STOPPED", None, EventKind.WORKER_LOST),
])
def test_driver_exit_follows_the_exit_protocol(world, status, code, kind):
    la = _start_running(world)
    world["jobs"].status[f"{NAME}-driver"] = (status, code, "boom")
    (event,) = la.poll()
    assert (event.kind, event.attempt) == (kind, 1)
    assert la.poll() == []  # reported once


def test_a_hung_or_unreachable_head_does_not_stall_polling(world):
    import threading
    import time

    la = world["launcher"](api_timeout_s=0.2)
    la.start(make_job(num_ranks=8), 1)
    world["kube"].set_state(NS, NAME, "ready")
    la.poll()
    world["jobs"].fail_next_get = True
    assert la.poll() == []  # connection error: transient, the pod watch sees real deaths
    world["jobs"].hang = threading.Event()
    began = time.monotonic()
    assert la.poll() == []
    assert time.monotonic() - began < 5
    world["jobs"].hang.set()
    world["jobs"].hang = None
    world["jobs"].status[f"{NAME}-driver"] = ("SUCCEEDED", 0, "")
    assert _kinds(la.poll()) == [(EventKind.COMPLETED, 1)]


def test_an_api_error_on_one_cluster_does_not_block_the_others(world):
    from kubernetes.client.exceptions import ApiException

    kube = world["kube"]
    la = world["launcher"]()
    la.start(make_job(num_ranks=8), 1)
    la.start(make_job(num_ranks=8, job_id="other-00aa11bb22"), 1)
    kube.set_state(NS, NAME, "ready")
    kube.set_state(NS, "rm-other-00aa11bb22-a1", "ready")
    real_get = kube.get_namespaced_custom_object

    def flaky_get(group, version, namespace, plural, name, **kw):
        if name == NAME:
            raise ApiException(status=500, reason="Internal Server Error")
        return real_get(group, version, namespace, plural, name, **kw)

    kube.get_namespaced_custom_object = flaky_get
    assert la.poll() == []
    assert set(world["jobs"].submitted) == {"rm-other-00aa11bb22-a1-driver"}
    kube.get_namespaced_custom_object = real_get
    la.poll()
    assert f"{NAME}-driver" in world["jobs"].submitted


def test_worker_lost_then_stop_then_restart(world):
    kube = world["kube"]
    la = _start_running(world)
    world["jobs"].status[f"{NAME}-driver"] = ("FAILED", 1, "rank 3 died")
    assert _kinds(la.poll()) == [(EventKind.WORKER_LOST, 1)]
    la.stop(JOB_ID)  # what the state machine does next
    la.start(make_job(num_ranks=16), 2)  # and, after the back-off, the next attempt
    assert (NS, f"rm-{JOB_ID}-a2") in kube.clusters
    kube.finish_deletes()
    assert _kinds(la.poll()) == [(EventKind.STOPPED, 1)]  # the machine drops it as stale


def test_readiness_timeout_says_why(world):
    kube, clock = world["kube"], world["clock"]
    la = world["launcher"]()
    la.start(make_job(num_ranks=8), 1)
    pod = recorded("healthy_start")[1]["object"]  # the worker waiting for a GPU node
    kube.pods[(NS, pod["metadata"]["name"])] = pod
    la.sync_pods(NS)
    clock.now += 599
    assert la.poll() == []
    clock.now += 2
    (event,) = la.poll()
    assert event.kind is EventKind.WORKER_LOST
    assert "not ready after 600 s" in event.message
    assert "Insufficient nvidia.com/gpu" in event.message


@pytest.mark.parametrize("fixture, kind", [
    ("worker_oom_killed", EventKind.WORKER_LOST),
    ("worker_invalid_image", EventKind.FAILED),
])
def test_pod_watch_feeds_the_restart_policy(world, fixture, kind):
    la = _start_running(world)
    world["watch"].script = recorded(fixture)
    la.sync_pods(NS)
    events = la.poll()
    assert _kinds(events) == [(kind, 1)]
    kwargs = world["watch"].kwargs[-1]
    assert kwargs["label_selector"] == "ringmaster.io/owner=rm-ringmaster"
    assert kwargs["namespace"] == NS and kwargs["resource_version"] == "100"


def test_a_pod_that_vanished_between_watches_is_a_loss(world):
    kube = world["kube"]
    la = _start_running(world)
    pod = recorded("worker_deleted")[0]["object"]
    kube.pods[(NS, pod["metadata"]["name"])] = pod
    la.sync_pods(NS)
    assert la.poll() == []
    del kube.pods[(NS, pod["metadata"]["name"])]  # deleted while the watch was down
    la.sync_pods(NS)
    (event,) = la.poll()
    assert event.kind is EventKind.WORKER_LOST and "was deleted" in event.message


def test_stopping_pods_are_not_losses(world):
    la = _start_running(world)
    la.stop(JOB_ID)
    world["watch"].script = recorded("teardown_and_foreign")
    la.sync_pods(NS)
    assert la.poll() == []


def test_stop_of_an_unknown_job_reports_stopped(world):
    la = world["launcher"]()
    assert _kinds((la.stop("nope-0000000000"), la.poll())[1]) == [(EventKind.STOPPED, 0)]


def test_admission_caps_gpus(world):
    la = world["launcher"](max_gpus=24)
    big, small = make_job(num_ranks=16), make_job(num_ranks=8, job_id="other-00aa11bb22")
    assert la.admit(big)
    la.start(big, 1)
    assert la.admit(small)  # 16 + 8 = 24
    assert not la.admit(make_job(num_ranks=16, job_id="third-00aa11bb22"))
    assert la.admit(big)  # a job never competes with its own previous attempt
    cpu = make_job(num_ranks=4, cluster="cpu", job_id="cpu-00aa11bb22")
    la.start(small, 1)
    assert la.admit(cpu)  # CPU ranks hold no GPUs


def test_restart_adopts_clusters_and_never_submits_twice(world):
    kube, jobs = world["kube"], world["jobs"]
    first = _start_running(world)
    assert f"{NAME}-driver" in jobs.submitted
    first.start(make_job(num_ranks=16), 2)  # attempt 1 is being deleted, 2 is new
    kube.deleting.clear()  # pretend the deletion had not been issued when we crashed
    second = world["launcher"]()  # a controller restart
    assert (NS, NAME) in kube.deleting  # the superseded attempt is cleaned up
    kube.set_state(NS, f"rm-{JOB_ID}-a2", "ready")
    second.poll()
    assert f"rm-{JOB_ID}-a2-driver" in jobs.submitted
    third = world["launcher"]()  # restarted again, after the driver was submitted
    kube.set_state(NS, f"rm-{JOB_ID}-a2", "ready")
    third.poll()  # "already exists" is not an error: it is the same driver
    jobs.status[f"rm-{JOB_ID}-a2-driver"] = ("SUCCEEDED", 0, "")
    assert (EventKind.COMPLETED, 2) in _kinds(third.poll())


def test_existing_cluster_on_create_is_adopted(world):
    la, other = world["launcher"](), world["launcher"]()
    la.start(make_job(num_ranks=8), 1)
    other.start(make_job(num_ranks=8), 1)  # 409 from the API server: adopt, don't fail
    assert len(world["kube"].clusters) == 1


def test_api_calls_are_exactly_the_rbac_rules(world):
    """Every verb the chart grants is used, and nothing else is called."""
    la = _start_running(world)
    world["watch"].script = recorded("worker_oom_killed")
    la.sync_pods(NS)
    la.poll()
    la.stop(JOB_ID)
    world["kube"].finish_deletes()
    la.poll()
    world["launcher"]()  # a restart lists clusters
    granted = {(r.api_group, r.resource, v) for r in LAUNCHER_RBAC_RULES for v in r.verbs}
    assert set(world["kube"].calls) == granted


def test_make_launcher_builds_it_by_name(world):
    la = make_launcher("kubernetes", config=launcher_config(), custom_api=world["kube"],
                       core_api=world["kube"], ray_jobs=world["jobs"],
                       watch_factory=FakeWatch, watch=False)
    assert isinstance(la, KubernetesLauncher) and la.name == "kubernetes"


def test_watch_threads_deliver_events_and_close(world):
    import time

    world["watch"].script = recorded("worker_oom_killed")
    la = KubernetesLauncher(config=launcher_config(), custom_api=world["kube"],
                            core_api=world["kube"], ray_jobs=world["jobs"],
                            watch_factory=lambda: world["watch"], clock=world["clock"],
                            watch=True)
    la.start(make_job(num_ranks=16), 1)
    deadline = time.monotonic() + 10
    events = []
    while not events and time.monotonic() < deadline:
        events = [e for e in la.poll() if e.kind is EventKind.WORKER_LOST]
        time.sleep(0.01)
    la.close()
    assert "OOMKilled" in events[0].message
    assert all(not t.is_alive() for t in la._threads)


ENV = {
    "RINGMASTER_K8S_NAMESPACES": "jobs-a, jobs-b",
    "RINGMASTER_K8S_IMAGE": "r/w:1",
    "RINGMASTER_K8S_RAY_VERSION": "2.60.0",
    "RINGMASTER_K8S_OWNER": "rm-ringmaster",
    "RINGMASTER_K8S_HEAD_RESOURCES": '{"requests": {"cpu": "1", "memory": "2Gi"}, '
                                     '"limits": {"cpu": "1", "memory": "2Gi"}}',
    "RINGMASTER_K8S_READY_TIMEOUT_S": "120",
    "RINGMASTER_K8S_MAX_GPUS": "64",
    "RINGMASTER_CONTROLLER_ADDRESS": "rm-ringmaster.ml.svc:50051",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret",
    "OTEL_SERVICE_NAME": "ringmaster-controller",
    "REDIS_URL": "redis://:pw@r:6379/0",
}


def test_config_from_the_charts_env():
    c = KubernetesLauncherConfig.from_env("0.0.0.0:50051", ENV)
    assert c.namespaces == ("jobs-a", "jobs-b")
    assert c.ready_timeout_s == 120 and c.max_gpus == 64
    s = c.cluster
    assert (s.image, s.owner, s.controller_address) == ("r/w:1", "rm-ringmaster",
                                                        "rm-ringmaster.ml.svc:50051")
    assert s.head_resources["limits"] == {"cpu": "1", "memory": "2Gi"}
    # OTLP settings travel to the workers; credentials and the controller's name do not.
    assert dict(s.env) == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"}


@pytest.mark.parametrize("change, message", [
    ({"RINGMASTER_CONTROLLER_ADDRESS": ""}, "not reachable from worker pods"),
    ({"RINGMASTER_K8S_IMAGE": ""}, "RINGMASTER_K8S_IMAGE"),
    ({"RINGMASTER_K8S_MAX_GPUS": "many"}, "RINGMASTER_K8S_MAX_GPUS='many' is not an integer"),
    ({"RINGMASTER_K8S_HEAD_RESOURCES": "[1]"}, "must be a JSON object"),
    ({"RINGMASTER_K8S_MAX_GPUS": "-1"}, "max_gpus=-1"),
])
def test_config_errors_name_the_variable(change, message):
    with pytest.raises(ValueError, match=message):
        KubernetesLauncherConfig.from_env("0.0.0.0:50051", {**ENV, **change})


def test_importing_the_launcher_loads_no_torch_workers_ray_or_kubernetes():
    """The controller stays small: clients load only when a launcher is built for real."""
    import subprocess
    import sys

    code = ("import sys, controller.launchers.kubernetes, controller.launchers.podwatch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'workers', 'ray', 'kubernetes')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]"
