"""The pod watch logic against recorded pod events (tests/deploy/fixtures/pod_events/)."""

from __future__ import annotations

import copy

import pytest

from controller.launchers.base import EventKind
from controller.launchers.podwatch import PodTracker, pod_failure
from tests.deploy.kube_fakes import recorded

JOB_ID = "tiny-run-3f9a0c1b2d"


def _replay(name: str, tracker: PodTracker | None = None):
    tracker = tracker or PodTracker("rm-ringmaster")
    out = []
    for ev in recorded(name):
        out += tracker.observe(ev["type"], ev["object"])
    return out, tracker


@pytest.mark.parametrize("fixture, kind, needle", [
    ("worker_oom_killed", EventKind.WORKER_LOST, "OOMKilled (exit 137)"),
    ("worker_crash_seen_after_restart", EventKind.WORKER_LOST,
     "restarted after Error (exit 1): raylet died"),
    ("head_evicted", EventKind.WORKER_LOST, "failed: Evicted: The node was low on resource"),
    ("worker_drained", EventKind.WORKER_LOST, "being disrupted: EvictionByEvictionAPI"),
    ("worker_deleted", EventKind.WORKER_LOST, "was deleted"),
    ("worker_image_pull_backoff", EventKind.WORKER_LOST, "ImagePullBackOff"),
    ("worker_invalid_image", EventKind.FAILED, "InvalidImageName"),
])
def test_one_event_per_failed_attempt(fixture, kind, needle):
    events, _ = _replay(fixture)
    assert len(events) == 1, events
    (event,) = events
    assert (event.job_id, event.attempt, event.kind) == (JOB_ID, 1, kind)
    assert needle in event.message
    assert "-a1-" in event.message  # names the pod


def test_healthy_start_is_silent_and_readiness_is_tracked():
    tracker = PodTracker("rm-ringmaster")
    events = recorded("healthy_start")
    for ev in events[:2]:
        assert tracker.observe(ev["type"], ev["object"]) == []
    diag = tracker.diagnose(JOB_ID, 1)
    assert diag.startswith("0/2 pods ready")
    assert "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in diag
    for ev in events[2:]:
        assert tracker.observe(ev["type"], ev["object"]) == []
    assert tracker.diagnose(JOB_ID, 1) == "2/2 pods ready"
    assert {p.node_type for p in tracker.attempt_pods(JOB_ID, 1)} == {"head", "worker"}


def test_teardown_by_us_and_other_controllers_pods_are_silent():
    tracker = PodTracker("rm-ringmaster")
    tracker.ignore_through(JOB_ID, 1)
    events, tracker = _replay("teardown_and_foreign", tracker)
    assert events == []
    assert tracker.attempt_pods(JOB_ID, 1) == []  # both pods gone


def test_teardown_without_ignore_reports_the_first_death_only():
    events, _ = _replay("teardown_and_foreign")
    assert len(events) == 1 and "exit 143" in events[0].message


def test_a_new_attempt_is_watched_after_the_old_one_is_ignored():
    tracker = PodTracker("rm-ringmaster")
    tracker.ignore_through(JOB_ID, 1)
    pod = copy.deepcopy(recorded("head_evicted")[-1]["object"])
    assert tracker.observe("MODIFIED", pod) == []  # attempt 1: ours to delete
    pod["metadata"]["labels"]["ringmaster.io/attempt"] = "2"
    (event,) = tracker.observe("MODIFIED", pod)
    assert event.attempt == 2
    tracker.forget_job(JOB_ID)
    assert tracker.observe("MODIFIED", pod) != []  # forgotten: reported afresh


def test_pods_without_our_labels_are_ignored():
    pod = copy.deepcopy(recorded("head_evicted")[-1]["object"])
    tracker = PodTracker("rm-ringmaster")
    pod["metadata"]["labels"]["ringmaster.io/attempt"] = "not-a-number"
    assert tracker.observe("MODIFIED", pod) == []
    del pod["metadata"]["labels"]["ringmaster.io/job-id"]
    assert tracker.observe("MODIFIED", pod) == []


def test_a_clean_exit_is_not_a_failure():
    pod = copy.deepcopy(recorded("worker_oom_killed")[2]["object"])
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 0, "reason": "Completed"}}
    assert pod_failure("MODIFIED", pod) is None


def test_err_image_pull_alone_waits_for_the_back_off():
    pull = recorded("worker_image_pull_backoff")[1]["object"]
    assert pull["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
    assert pod_failure("MODIFIED", pull) is None  # a registry hiccup retries first
