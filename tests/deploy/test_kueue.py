"""Kueue gang admission, per-job steering at submit, and the labels of every created object.

The state machine and the job store are real (embedded Redis); the Kubernetes API is
tests/deploy/kube_fakes.FakeKube, where the test plays Kueue by lifting `spec.suspend`
(what Kueue does when it admits a RayCluster's whole gang).
"""

from __future__ import annotations

import dataclasses

import pytest
from kubernetes.client.exceptions import ApiException

from controller.api import ApiSettings, create_app
from controller.cli_jobs import job_table
from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.kuberay import LABEL_ATTEMPT, LABEL_JOB, LABEL_JOB_NAME
from controller.launchers.kubernetes import KubernetesLauncher
from controller.launchers.workerpods import WorkerPodSettings
from controller.machine import JobStateMachine
from controller.redis_server import open_redis
from controller.schemas import JobPublic
from controller.states import State
from controller.store import JobStore
from tests.controller.harness import DEMO_DATA
from tests.deploy.kube_fakes import (
    NS,
    FakeKube,
    FakeRayJobs,
    FakeWatch,
    launcher_config,
    make_job,
)

# The starlette TestClient warns that it will move to httpx2; the behaviour tested is ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

QUEUE = "gpu-team-a"
SPEC = {"name": "long-ctx", "model": "tiny", "dataset": {"path": DEMO_DATA},  # submit reads it
        "resources": {"num_ranks": 16, "cluster": "h100"},
        "training": {"steps": 10, "global_batch_tokens": 4096}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_handle(tmp_path_factory):
    handle = open_redis(state_dir=tmp_path_factory.mktemp("redis"))
    yield handle
    handle.close()


@pytest.fixture
def world(redis_handle):
    redis_handle.client.flushdb()
    kube, jobs, clock = FakeKube(), FakeRayJobs(), Clock()

    def launcher(queue: str = QUEUE, **kw) -> KubernetesLauncher:
        config = launcher_config(**kw)
        workers = WorkerPodSettings(queue_name=queue, job_service_accounts=("team-a",))
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster,
                                                                         workers=workers))
        return KubernetesLauncher(config=config, custom_api=kube, core_api=kube,
                                  ray_jobs=jobs, watch_factory=FakeWatch, clock=clock,
                                  watch=False)

    store = JobStore(redis_handle.client)
    return dict(kube=kube, jobs=jobs, clock=clock, launcher=launcher, store=store)


def _machine(world, **kw):
    la = world["launcher"](**kw)
    return la, JobStateMachine(store=world["store"], launcher=la, clock=world["clock"])


def _submit(world, spec=None):
    from controller.spec import parse_job_spec

    rec, _ = world["store"].create(parse_job_spec(spec or SPEC))
    return rec


def _only_cluster(kube) -> tuple[tuple[str, str], dict]:
    (item,) = kube.clusters.items()
    return item


def test_a_queued_job_is_pending_until_kueue_admits_its_gang(world):
    kube, store = world["kube"], world["store"]
    la, machine = _machine(world)
    job = _submit(world)
    machine.tick()
    rec = store.get(job.id)
    assert rec.state is State.PENDING and rec.attempt == 0
    assert (rec.reason, rec.message) == ("AwaitingAdmission",
                                         f"waiting for Kueue admission in queue {QUEUE}")
    (ns, name), rc = _only_cluster(kube)
    assert rc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert rc["spec"]["suspend"] is True and name.endswith("-a1")
    table = job_table([JobPublic.of(rec)])
    assert f"Pending: waiting for Kueue admission in queue {QUEUE}" in \
        [cell for col in table.columns for cell in col._cells]
    for _ in range(3):  # still suspended: still Pending, created once
        world["clock"].now += 5
        machine.tick()
    assert store.get(job.id).state is State.PENDING
    assert [c for c in kube.calls if c[2] == "create"] == [("ray.io", "rayclusters", "create")]

    kube.kueue_admits(ns, name)
    world["clock"].now += 5
    machine.tick()
    rec = store.get(job.id)
    assert (rec.state, rec.attempt) == (State.SCHEDULING, 1)
    assert [c for c in kube.calls if c[2] == "create"] == [("ray.io", "rayclusters", "create")]
    kube.set_state(ns, name, "ready")
    world["clock"].now += 5
    machine.tick()
    assert f"{name}-driver" in world["jobs"].submitted  # the same cluster runs the driver


def test_readiness_clock_starts_when_kueue_admits_not_while_queued(world):
    kube = world["kube"]
    la, machine = _machine(world)  # ready_timeout_s=600
    job = _submit(world)
    machine.tick()
    world["clock"].now += 3600  # an hour in the queue is not a readiness timeout
    machine.tick()
    (ns, name), _ = _only_cluster(kube)
    kube.kueue_admits(ns, name)
    world["clock"].now += 1
    machine.tick()
    assert world["store"].get(job.id).state is State.SCHEDULING
    world["clock"].now += 599
    machine.tick()
    assert world["store"].get(job.id).state is State.SCHEDULING
    world["clock"].now += 2
    machine.tick()
    machine.tick()
    assert world["store"].get(job.id).state is State.RESTARTING  # 600 s after admission


def test_stopping_a_queued_job_deletes_its_suspended_cluster(world):
    kube = world["kube"]
    la, machine = _machine(world)
    job = _submit(world)
    machine.tick()
    machine.request_stop(job.id)
    assert world["store"].get(job.id).state is State.STOPPED
    assert kube.deleting == set(kube.clusters)  # its place in the queue is given back


def test_a_queued_job_stopped_on_another_replica_loses_its_cluster(world):
    """A standby's stop moves the job in the store only; the leader's next pass sees that
    the job no longer waits and deletes its suspended cluster."""
    kube = world["kube"]
    la, machine = _machine(world)
    job = _submit(world)
    other = _submit(world, {**SPEC, "name": "other"})
    machine.tick()
    assert len(kube.clusters) == 2
    world["store"].transition(job.id, src=State.PENDING, dst=State.STOPPED,
                              reason="StopRequested")
    world["clock"].now += 1
    machine.tick()
    assert {k[1] for k in kube.deleting} == {f"rm-{job.id}-a1"}
    assert world["store"].get(other.id).state is State.PENDING  # still queued, untouched


def test_a_restarted_job_queues_again(world):
    kube, store = world["kube"], world["store"]
    la, machine = _machine(world)
    job = _submit(world)
    machine.tick()
    (ns, name), _ = _only_cluster(kube)
    kube.kueue_admits(ns, name)
    world["clock"].now += 5
    machine.tick()
    la.report(LauncherEvent(job_id=job.id, attempt=1, kind=EventKind.WORKER_LOST,
                            message="rank 3 lost"))
    machine.tick()
    assert store.get(job.id).state is State.RESTARTING
    kube.finish_deletes()
    world["clock"].now += 120  # past the back-off
    machine.tick()
    rec = store.get(job.id)
    assert (rec.state, rec.reason) == (State.RESTARTING, "AwaitingAdmission")
    second = kube.clusters[(NS, name.replace("-a1", "-a2"))]
    assert second["spec"]["suspend"] is True
    assert second["metadata"]["labels"][LABEL_ATTEMPT] == "2"


def test_a_controller_restart_finds_queued_clusters_again(world):
    kube = world["kube"]
    la, machine = _machine(world)
    job = _submit(world)
    machine.tick()
    la2, machine2 = _machine(world)  # a new leader: adopts the suspended cluster
    machine2.tick()
    assert len(kube.clusters) == 1  # not created twice
    (ns, name), _ = _only_cluster(kube)
    kube.kueue_admits(ns, name)
    world["clock"].now += 5
    machine2.tick()
    assert world["store"].get(job.id).state is State.SCHEDULING


def test_no_queue_no_label_no_suspension(world):
    kube = world["kube"]
    la, machine = _machine(world, queue="")
    _submit(world)
    machine.tick()
    _, rc = _only_cluster(kube)
    assert "kueue.x-k8s.io/queue-name" not in rc["metadata"]["labels"]
    assert "suspend" not in rc["spec"]


def test_a_job_picks_its_own_queue(world):
    kube = world["kube"]
    la, machine = _machine(world, queue="")
    spec = {**SPEC, "resources": {**SPEC["resources"],
                                  "kubernetes": {"queue_name": "research"}}}
    job = _submit(world, spec)
    machine.tick()
    _, rc = _only_cluster(kube)
    assert rc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert world["store"].get(job.id).message == "waiting for Kueue admission in queue research"


def test_gpu_cap_says_what_the_job_waits_for(world):
    la, machine = _machine(world, queue="", max_gpus=16)
    first = _submit(world)
    machine.tick()
    second = _submit(world, {**SPEC, "name": "second"})
    machine.tick()
    assert world["store"].get(first.id).state is State.SCHEDULING
    rec = world["store"].get(second.id)
    assert (rec.state, rec.reason) == (State.PENDING, "AwaitingAdmission")
    assert rec.message == "waiting for 16 GPUs: 16 of launcher.kubernetes.maxGpus=16 are " \
                          "held by other jobs"


def test_an_object_the_api_server_refuses_fails_the_job_at_once(world):
    kube = world["kube"]
    refused = ApiException(status=422, reason="Unprocessable Entity")
    refused.body = '{"kind": "Status", "message": "RayCluster.ray.io \\"x\\" is invalid"}'
    kube.refuse["create rayclusters"] = refused
    la, machine = _machine(world, queue="")
    job = _submit(world)
    machine.tick()
    machine.tick()
    rec = world["store"].get(job.id)
    assert rec.state is State.FAILED and "is invalid" in rec.message  # no futile restarts


def test_every_object_the_launcher_creates_carries_the_three_labels(world):
    kube = world["kube"]
    la, machine = _machine(world)
    job = _submit(world)
    machine.tick()
    (ns, name), _ = _only_cluster(kube)
    kube.kueue_admits(ns, name)
    world["clock"].now += 5
    machine.tick()
    la.report(LauncherEvent(job_id=job.id, attempt=1, kind=EventKind.WORKER_LOST))
    machine.tick()
    kube.finish_deletes()
    world["clock"].now += 120
    machine.tick()  # attempt 2 created (queued)
    assert len(kube.created) == 2
    want = {LABEL_JOB: job.id, LABEL_JOB_NAME: "long-ctx"}
    for obj, attempt in zip(kube.created, ("1", "2"), strict=True):
        templates = [obj["spec"]["headGroupSpec"]["template"],
                     *(g["template"] for g in obj["spec"]["workerGroupSpecs"])]
        for labels in [obj["metadata"]["labels"], *(t["metadata"]["labels"]
                                                    for t in templates)]:
            assert {**want, LABEL_ATTEMPT: attempt}.items() <= labels.items()


# submit-time checks ------------------------------------------------------------------------
@pytest.fixture
def api(world):
    from fastapi.testclient import TestClient

    la, machine = _machine(world)
    app = create_app(store=world["store"], machine=machine,
                     settings=ApiSettings(token="t" * 32))
    with TestClient(app, headers={"Authorization": "Bearer " + "t" * 32}) as client:
        yield client


def _with(**kubernetes):
    return {**SPEC, "resources": {**SPEC["resources"], "kubernetes": kubernetes}}


@pytest.mark.parametrize("kubernetes, field", [
    ({"service_account_name": "cluster-admin"}, "service_account_name='cluster-admin'"),
    ({"resources": {"limits": {"nvidia.com/gpu": "8"}}}, "nvidia.com/gpu"),
    ({"resources": {"requests": {"cpu": "100"}, "limits": {"cpu": "10"}}}, "requests.cpu"),
    ({"extra_env": {"RINGMASTER_ATTEMPT": "9"}}, "extra_env"),
    ({"extra_resources": {"memory": 1}}, "extra_resources"),
    ({"tolerations": [{"key": "a", "operator": "Exist"}]}, "tolerations"),
    ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Within"}]}]}}}},
     "operator"),
    ({"affinity": {"nodeAfinity": {}}}, "nodeAfinity"),
    ({"node_selector": {"bad key!": "x"}}, "node_selector"),
    ({"shm_size": "lots"}, "shm_size"),
    ({"queue_name": "no spaces"}, "queue_name"),
])
def test_bad_steering_is_a_422_at_submit_naming_the_field(api, world, kubernetes, field):
    r = api.post("/v1/jobs", json=_with(**kubernetes))
    assert r.status_code == 422, r.text
    assert field in r.text and "resources.kubernetes" in r.text
    assert world["store"].count() == 0  # nothing stored, nothing created
    assert world["kube"].clusters == {}


def test_allowed_steering_is_accepted(api):
    r = api.post("/v1/jobs", json=_with(service_account_name="team-a",
                                        node_selector={"pool": "h100"},
                                        extra_env={"NCCL_DEBUG": "WARN"}))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["resources"]["kubernetes"]["node_selector"] == {"pool": "h100"}


def test_other_launchers_refuse_the_kubernetes_section():
    from controller.launchers.base import StandbyLauncher, reject_kubernetes_section
    from controller.spec import parse_job_spec
    from scheduler.errors import SpecError

    spec = parse_job_spec(_with(node_selector={"a": "b"}))
    with pytest.raises(SpecError, match="resources.kubernetes: this controller runs the ray"):
        reject_kubernetes_section(spec, "ray")
    StandbyLauncher().check_spec(spec)  # a standby with no rules of its own accepts
    job = make_job(num_ranks=8)
    assert job.spec.resources.kubernetes is None
