"""The Kubernetes launcher under the real job state machine (embedded Redis, fake API).

A pod failure seen by the watch must reach the job's restart policy: attempt 1's
RayCluster is deleted, attempt 2 gets a new one after the back-off, and a finished driver
ends the job and frees its GPUs. Also the gang admission cap against the real machine.
"""

from __future__ import annotations

import copy

import pytest

from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.kubernetes import KubernetesLauncher
from controller.machine import JobStateMachine
from controller.redis_server import open_redis
from controller.spec import parse_job_spec
from controller.states import State
from controller.store import JobStore
from tests.deploy.kube_fakes import NS, FakeKube, FakeRayJobs, FakeWatch, launcher_config, recorded


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plant(tmp_path):
    redis = open_redis(state_dir=tmp_path / "state")
    clock, kube, jobs, watch = Clock(), FakeKube(), FakeRayJobs(), FakeWatch()
    launcher = KubernetesLauncher(config=launcher_config(max_gpus=16), custom_api=kube,
                                  core_api=kube, ray_jobs=jobs, watch_factory=lambda: watch,
                                  clock=clock, watch=False)
    store = JobStore(redis.client, clock=clock)
    machine = JobStateMachine(store=store, launcher=launcher, clock=clock)
    yield dict(store=store, machine=machine, launcher=launcher, kube=kube, jobs=jobs,
               watch=watch, clock=clock)
    launcher.close()
    redis.close()


def _submit(store, name: str, num_ranks: int):
    spec = parse_job_spec({"name": name, "model": "tiny", "dataset": {"path": "/data/t"},
                           "resources": {"num_ranks": num_ranks, "cluster": "h100"},
                           "training": {"steps": 10, "global_batch_tokens": 4096},
                           "failure": {"max_restarts": 2}})
    job, _ = store.create(spec)
    return job.id


def _pod_events_for(job_id: str, fixture: str) -> list[dict]:
    events = copy.deepcopy(recorded(fixture))
    for ev in events:
        ev["object"]["metadata"]["labels"]["ringmaster.io/job-id"] = job_id
    return events


def _ready_and_running(p, job_id: str, attempt: int) -> None:
    m, kube = p["machine"], p["kube"]
    name = f"rm-{job_id}-a{attempt}"
    assert (NS, name) in kube.clusters
    kube.set_state(NS, name, "ready")
    m.tick()  # submits the driver
    assert f"{name}-driver" in p["jobs"].submitted
    p["launcher"].report(LauncherEvent(job_id=job_id, attempt=attempt, kind=EventKind.READY))
    m.tick()
    assert p["store"].get(job_id).state is State.RUNNING


def test_pod_failure_restarts_the_job_on_a_new_raycluster(plant):
    p = plant
    store, m, kube = p["store"], p["machine"], p["kube"]
    job_id = _submit(store, "long-ctx", 16)
    m.tick()
    assert store.get(job_id).state is State.SCHEDULING
    _ready_and_running(p, job_id, 1)

    p["watch"].script = _pod_events_for(job_id, "worker_oom_killed")
    p["launcher"].sync_pods(NS)
    m.tick()
    job = store.get(job_id)
    assert job.state is State.RESTARTING and "OOMKilled" in job.message
    assert (NS, f"rm-{job_id}-a1") in kube.deleting  # the rest of the group is torn down

    kube.finish_deletes()
    p["clock"].now += 5  # past the first back-off (1 s)
    m.tick()
    assert store.get(job_id).state is State.SCHEDULING and store.get(job_id).attempt == 2
    _ready_and_running(p, job_id, 2)

    p["jobs"].status[f"rm-{job_id}-a2-driver"] = ("SUCCEEDED", 0, "all steps done")
    m.tick()
    assert store.get(job_id).state is State.SUCCEEDED
    assert (NS, f"rm-{job_id}-a2") in kube.deleting


def test_gang_admission_waits_for_gpus(plant):
    p = plant
    store, m = p["store"], p["machine"]
    first = _submit(store, "first", 16)
    second = _submit(store, "second", 8)
    m.tick()
    assert store.get(first).state is State.SCHEDULING
    assert store.get(second).state is State.PENDING  # 16 + 8 > 16 GPUs
    _ready_and_running(p, first, 1)
    p["jobs"].status[f"rm-{first}-a1-driver"] = ("SUCCEEDED", 0, "")
    m.tick()
    assert store.get(first).state is State.SUCCEEDED
    assert store.get(second).state is State.PENDING  # GPUs are free when the pods are gone
    p["kube"].finish_deletes()
    m.tick()  # STOPPED of the finished attempt frees its GPUs
    m.tick()
    assert store.get(second).state is State.SCHEDULING


def test_stop_request_deletes_the_cluster(plant):
    p = plant
    store, m = p["store"], p["machine"]
    job_id = _submit(store, "stopme", 8)
    m.tick()
    _ready_and_running(p, job_id, 1)
    m.request_stop(job_id)
    assert (NS, f"rm-{job_id}-a1") in p["kube"].deleting
    m.tick()
    assert store.get(job_id).state is State.STOPPING  # pods still terminating
    p["kube"].finish_deletes()
    m.tick()
    assert store.get(job_id).state is State.STOPPED
