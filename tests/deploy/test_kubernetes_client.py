"""The launcher through the real `kubernetes` client (config, REST calls, Watch) over HTTP.

tests/deploy/kube_http.py plays the API server, so request paths, bodies, query
parameters, watch streaming and 404/409 handling are the client library's own, and the
requests it sees are the RBAC verbs the chart grants.
"""

from __future__ import annotations

import pytest

from controller.launchers.base import EventKind
from controller.launchers.kuberay import LAUNCHER_RBAC_RULES
from controller.launchers.kubernetes import KubernetesLauncher
from tests.deploy.kube_fakes import NS, FakeRayJobs, launcher_config, make_job, recorded
from tests.deploy.kube_http import KubeHttp

JOB_ID = "tiny-run-3f9a0c1b2d"
NAME = f"rm-{JOB_ID}-a1"


@pytest.fixture
def api(tmp_path, monkeypatch):
    with KubeHttp() as server:
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(server.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(cfg))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
        yield server


def test_lifecycle_through_the_real_client(api):
    jobs = FakeRayJobs()
    la = KubernetesLauncher(config=launcher_config(api_timeout_s=10), ray_jobs=jobs,
                            watch=False, worker_secret=lambda job, attempt: f"s{attempt}")
    try:
        la.start(make_job(num_ranks=16), 1)
        created = api.clusters[(NS, NAME)]
        assert api.secrets[(NS, f"{NAME}-worker")]["stringData"] == {"worker-secret": "s1"}
        assert created["spec"]["workerGroupSpecs"][0]["replicas"] == 2
        assert la.poll() == []  # no status yet
        created["status"] = {"state": "ready"}
        la.poll()
        assert f"{NAME}-driver" in jobs.submitted

        api.watch_events = recorded("worker_oom_killed")
        la.sync_pods(NS, timeout_s=5)
        (lost,) = la.poll()
        assert lost.kind is EventKind.WORKER_LOST and "OOMKilled" in lost.message

        la.stop(JOB_ID)
        assert (NS, NAME) not in api.clusters and not api.secrets
        assert [(e.kind, e.attempt) for e in la.poll()] == [(EventKind.STOPPED, 1)]
        la.start(make_job(num_ranks=16), 2)
        KubernetesLauncher(config=launcher_config(), ray_jobs=jobs, watch=False).close()
    finally:
        la.close()
    granted = {(r.api_group, r.resource, v) for r in LAUNCHER_RBAC_RULES for v in r.verbs}
    assert set(api.calls) == granted


def test_unreachable_api_server_at_start_is_retried(tmp_path, monkeypatch):
    cfg = tmp_path / "kubeconfig"
    with KubeHttp() as server:
        cfg.write_text(server.kubeconfig())
    # The server is gone: its port refuses connections.
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    la = KubernetesLauncher(config=launcher_config(api_timeout_s=2), ray_jobs=FakeRayJobs(),
                            watch=False)
    assert la.poll() == [] and la._adopted is False
    la.close()


def test_controller_builds_the_launcher_from_the_charts_env(api, render, tmp_path,
                                                            monkeypatch):
    """`ringmaster serve --launcher=kubernetes` in the chart's pod: env in, launcher out."""
    from controller.server import Controller, ControllerConfig

    r = render(values_file="kubernetes-launcher-on")
    (deployment,) = r.of_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for e in container["env"]:
        if "value" in e and not e["name"].startswith("REDIS"):
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.delenv("REDIS_URL", raising=False)  # embedded Redis in tmp_path instead
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"][1:])
    assert args["grpc-port"] == "50051"  # what RINGMASTER_CONTROLLER_ADDRESS names
    # A free port here: this machine may have something on 50051.
    config = ControllerConfig(state_dir=tmp_path / "state", host="127.0.0.1", port=0,
                              grpc_port=0, launcher=args["launcher"], token="t" * 32)
    controller = Controller(config)
    try:
        launcher = controller.launcher
        assert isinstance(launcher, KubernetesLauncher)
        assert launcher.config.cluster.controller_address == "rm-ringmaster.ml.svc:50051"
        assert launcher.config.namespaces == ("ringmaster-jobs", "ringmaster-batch")
        assert ("ray.io", "rayclusters", "list") in api.calls  # adoption ran at start
        # The gRPC service runs (the launcher takes READY from it); workers are told the
        # Service address, not the bind address.
        assert controller.worker_service is not None and controller.grpc_port > 0
    finally:
        controller.close()
