"""KubernetesLauncher holds no lock across an API request.

The gRPC worker service calls `report()` from its own threads; the state machine's thread
makes every other call, and those talk to the API server (30 s timeouts). Here the fake
API server blocks one request until the test releases it; while start, stop, a poll or
the adoption after a restart waits inside that request, `report()` and the cheap readers
(`tracks`, `admission_message`) must return. The bound is generous (10 s, for a loaded
2-core box): without the fix they would wait for the blocked request, i.e. forever here.
"""

from __future__ import annotations

import threading

import pytest

from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.kubernetes import KubernetesLauncher
from tests.deploy.kube_fakes import NS, FakeKube, FakeRayJobs, FakeWatch, launcher_config, make_job

JOB_ID = "tiny-run-3f9a0c1b2d"
NAME = f"rm-{JOB_ID}-a1"
PROMPTLY_S = 10.0  # "did not block", not a performance figure


class Gate:
    """Replaces `owner.method` by a call that says it entered, then waits for `release`."""

    def __init__(self, monkeypatch, owner, method: str):
        self.entered, self.release = threading.Event(), threading.Event()
        real = getattr(owner, method)

        def blocked(*args, **kwargs):
            self.entered.set()
            self.release.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, method, blocked)


def _returns_promptly(fn, *args):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(PROMPTLY_S)
    assert not t.is_alive(), f"{fn.__name__} waited for an API request of another thread"
    return out[0]


def _while_blocked(gate: Gate, operation, launcher: KubernetesLauncher) -> LauncherEvent:
    """Run `operation` until it blocks inside the API; meanwhile what the gRPC service
    calls must not block. Returns the event `report()` queued."""
    worker = threading.Thread(target=operation, daemon=True)
    worker.start()
    try:
        assert gate.entered.wait(PROMPTLY_S), "the operation never reached the API server"
        ready = LauncherEvent(job_id="other-00aa11bb22", attempt=1, kind=EventKind.READY)
        _returns_promptly(launcher.report, ready)
        _returns_promptly(launcher.tracks, JOB_ID, 1)
        _returns_promptly(launcher.admission_message, make_job(num_ranks=8))
    finally:
        gate.release.set()
        worker.join(60)
    assert not worker.is_alive()
    return ready


@pytest.fixture
def world():
    kube, jobs = FakeKube(), FakeRayJobs()

    def launcher(**kw):
        return KubernetesLauncher(config=launcher_config(**kw), custom_api=kube, core_api=kube,
                                  ray_jobs=jobs, watch_factory=FakeWatch, watch=False,
                                  worker_secret=lambda job, a: f"s-{job}-{a}")

    return kube, jobs, launcher


def _running(world) -> KubernetesLauncher:
    kube, jobs, launcher = world
    la = launcher()
    la.start(make_job(num_ranks=8), 1)
    kube.set_state(NS, NAME, "ready")
    assert la.poll() == [] and f"{NAME}-driver" in jobs.submitted
    return la


def test_start_blocked_in_the_api_does_not_block_report(world, monkeypatch):
    kube, _, launcher = world
    la = launcher()
    gate = Gate(monkeypatch, kube, "create_namespaced_custom_object")
    ready = _while_blocked(gate, lambda: la.start(make_job(num_ranks=8), 1), la)
    assert (NS, NAME) in kube.clusters and la.tracks(JOB_ID, 1)
    assert la.poll() == [ready]  # what report() queued is delivered, once


def test_stop_blocked_in_the_api_does_not_block_report(world, monkeypatch):
    kube, _, _ = world
    la = _running(world)
    gate = Gate(monkeypatch, kube, "delete_namespaced_custom_object")
    ready = _while_blocked(gate, lambda: la.stop(JOB_ID), la)
    assert (NS, NAME) in kube.deleting
    assert la.poll() == [ready]
    kube.finish_deletes()
    assert [(e.kind, e.attempt) for e in la.poll()] == [(EventKind.STOPPED, 1)]


def test_poll_blocked_in_the_api_does_not_block_report(world, monkeypatch):
    kube, jobs, launcher = world
    la = launcher()
    la.start(make_job(num_ranks=8), 1)
    kube.set_state(NS, NAME, "ready")
    gate = Gate(monkeypatch, kube, "get_namespaced_custom_object")
    events: list = []
    ready = _while_blocked(gate, lambda: events.extend(la.poll()), la)
    assert f"{NAME}-driver" in jobs.submitted  # the blocked check went on once released
    assert ready in events + la.poll()


def test_poll_waiting_for_a_ray_head_does_not_block_report(world, monkeypatch):
    _, jobs, _ = world
    la = _running(world)
    gate = Gate(monkeypatch, FakeRayJobs._Client, "get_job_info")
    jobs.status[f"{NAME}-driver"] = ("SUCCEEDED", 0, "done")
    events: list = []
    ready = _while_blocked(gate, lambda: events.extend(la.poll()), la)
    got = events + la.poll()
    assert ready in got and (EventKind.COMPLETED, 1) in [(e.kind, e.attempt) for e in got]


def test_adoption_blocked_in_the_api_does_not_block_report(world, monkeypatch):
    """A restarted controller deletes a superseded attempt it finds; while that request
    hangs, the ranks of the live attempt can still report."""
    kube, _, launcher = world
    first = _running(world)
    first.start(make_job(num_ranks=8), 2)  # attempt 1 is superseded...
    kube.deleting.clear()  # ...but its deletion had not been issued when we crashed
    kube.down = True
    second = launcher()  # the API server is away at the restart: adoption waits for poll
    assert second.tracks(JOB_ID, 2) is None
    kube.down = False
    gate = Gate(monkeypatch, kube, "delete_namespaced_custom_object")
    events: list = []
    ready = _while_blocked(gate, lambda: events.extend(second.poll()), second)
    assert (NS, NAME) in kube.deleting and second.tracks(JOB_ID, 2)
    assert ready in events + second.poll()
