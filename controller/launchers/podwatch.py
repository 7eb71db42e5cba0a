"""Pod watch for the Kubernetes launcher: Ray pod events in, worker-loss events out.

`PodTracker.observe(type, pod)` reads one watch event (ADDED/MODIFIED/DELETED and the pod
in API JSON form) of a pod the launcher labelled (controller, job, attempt; see
controller.launchers.kuberay) and returns the `LauncherEvent`s it implies:

- WORKER_LOST (the restart policy decides what follows): the pod failed (evicted, node
  lost), was deleted by someone else (drain, preemption), is marked for disruption, a Ray
  container terminated with an error or OOM, or restarted after a crash (KubeRay pods
  restart in place, but the rank actors inside are gone), or its image cannot be pulled
  (back-off; a registry outage heals, a wrong tag runs out of restarts).
- FAILED (a restart cannot fix it): the image name is invalid, or the container cannot be
  configured (a missing Secret or ConfigMap).

At most one event per (job, attempt): the first cause is the one the user sees. Pods of
an attempt the launcher itself tears down (`ignore_through`) produce nothing. The tracker
also keeps each pod's readiness and why it waits, so a readiness timeout can say which
pods are stuck and why (`diagnose`). Pure and single-threaded: the launcher feeds it
under its lock; tests feed it recorded events (tests/deploy/fixtures/pod_events/).
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.launchers.base import EventKind, LauncherEvent
from controller.launchers.kuberay import LABEL_ATTEMPT, LABEL_JOB, LABEL_NODE_TYPE, LABEL_OWNER

UNFIXABLE_WAITING = frozenset({"InvalidImageName", "CreateContainerConfigError"})
RETRYABLE_WAITING = frozenset({"ImagePullBackOff", "CrashLoopBackOff", "CreateContainerError"})


@dataclass(frozen=True, kw_only=True)
class PodView:
    """What the tracker keeps of one pod."""

    name: str
    job_id: str
    attempt: int
    node_type: str  # "head" or "worker" (KubeRay's ray.io/node-type)
    ready: bool
    waiting: str  # why it is not running yet ("" when nothing to say)


def _labels(pod: dict) -> dict:
    return (pod.get("metadata") or {}).get("labels") or {}


def _container_statuses(pod: dict) -> list[dict]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or [])]


def _condition(pod: dict, kind: str) -> dict | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _terminated_badly(term: dict | None) -> str | None:
    if not term:
        return None
    code, reason = term.get("exitCode", 0), term.get("reason") or ""
    if code == 0 and reason != "OOMKilled":
        return None
    detail = f": {term['message'].strip()}" if term.get("message") else ""
    return f"{reason or 'Error'} (exit {code}){detail}"


def pod_failure(event_type: str, pod: dict) -> tuple[EventKind, str] | None:
    """The worker-loss cause this event shows, or None when the pod is healthy/starting."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    if event_type == "DELETED":
        return EventKind.WORKER_LOST, f"pod {name} was deleted (drain, preemption or by hand)"
    if status.get("phase") == "Failed":
        why = status.get("reason") or "Failed"
        msg = f": {status['message']}" if status.get("message") else ""
        return EventKind.WORKER_LOST, f"pod {name} failed: {why}{msg}"
    disruption = _condition(pod, "DisruptionTarget")
    if disruption and disruption.get("status") == "True":
        return EventKind.WORKER_LOST, (f"pod {name} is being disrupted: "
                                       f"{disruption.get('reason', '')} "
                                       f"{disruption.get('message', '')}".rstrip())
    for cs in _container_statuses(pod):
        state = cs.get("state") or {}
        cname = cs.get("name", "?")
        bad = _terminated_badly(state.get("terminated"))
        if bad is None and cs.get("restartCount", 0) > 0:
            bad = _terminated_badly((cs.get("lastState") or {}).get("terminated"))
            bad = bad and f"restarted after {bad}"
        if bad:
            return EventKind.WORKER_LOST, f"container {cname} of pod {name} {bad}"
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in UNFIXABLE_WAITING or reason in RETRYABLE_WAITING:
            kind = EventKind.FAILED if reason in UNFIXABLE_WAITING else EventKind.WORKER_LOST
            return kind, f"container {cname} of pod {name}: {reason}: {waiting.get('message', '')}"
    return None


def _waiting_reason(pod: dict) -> str:
    sched = _condition(pod, "PodScheduled")
    if sched and sched.get("status") == "False":
        return f"{sched.get('reason', 'Unscheduled')}: {sched.get('message', '')}".strip()
    for cs in _container_statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return f"{cs.get('name', '?')} {waiting.get('reason', 'Waiting')}"
    return ""


class PodTracker:
    """Turns one controller's Ray pod events into launcher events (module docstring)."""

    def __init__(self, owner: str):
        self.owner = owner
        self.pods: dict[str, PodView] = {}  # by namespace/name
        self._reported: set[tuple[str, int]] = set()  # (job, attempt) already reported
        self._ignored: dict[str, int] = {}  # job -> highest attempt being torn down by us

    def ignore_through(self, job_id: str, attempt: int) -> None:
        """The launcher is deleting attempts <= `attempt` of the job: stay silent on them."""
        self._ignored[job_id] = max(attempt, self._ignored.get(job_id, 0))

    def forget_job(self, job_id: str) -> None:
        """Drop every memory of a finished job."""
        self._ignored.pop(job_id, None)
        self._reported = {k for k in self._reported if k[0] != job_id}
        self.pods = {k: v for k, v in self.pods.items() if v.job_id != job_id}

    def observe(self, event_type: str, pod: dict) -> list[LauncherEvent]:
        labels = _labels(pod)
        if labels.get(LABEL_OWNER) != self.owner or LABEL_JOB not in labels:
            return []
        try:
            job_id, attempt = labels[LABEL_JOB], int(labels.get(LABEL_ATTEMPT, ""))
        except ValueError:
            return []
        meta = pod.get("metadata") or {}
        key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        if event_type == "DELETED":
            self.pods.pop(key, None)
        else:
            ready = (_condition(pod, "Ready") or {}).get("status") == "True"
            self.pods[key] = PodView(name=meta.get("name", ""), job_id=job_id, attempt=attempt,
                                     node_type=labels.get(LABEL_NODE_TYPE, ""), ready=ready,
                                     waiting=_waiting_reason(pod))
        if attempt <= self._ignored.get(job_id, 0) or (job_id, attempt) in self._reported:
            return []
        failure = pod_failure(event_type, pod)
        if failure is None:
            return []
        self._reported.add((job_id, attempt))
        kind, message = failure
        return [LauncherEvent(job_id=job_id, attempt=attempt, kind=kind, message=message)]

    def resync(self, namespace: str, pods: list[dict]) -> list[LauncherEvent]:
        """A fresh list of the namespace's pods: observe each; known pods missing from it
        were deleted while nobody watched."""
        events: list[LauncherEvent] = []
        present = set()
        for pod in pods:
            present.add(f"{namespace}/{(pod.get('metadata') or {}).get('name', '')}")
            events += self.observe("ADDED", pod)
        for key, view in list(self.pods.items()):
            if key.startswith(f"{namespace}/") and key not in present:
                events += self.observe("DELETED", self._stub(namespace, view))
        return events

    def _stub(self, namespace: str, view: PodView) -> dict:
        return {"metadata": {"name": view.name, "namespace": namespace,
                             "labels": {LABEL_OWNER: self.owner, LABEL_JOB: view.job_id,
                                        LABEL_ATTEMPT: str(view.attempt),
                                        LABEL_NODE_TYPE: view.node_type}}}

    def attempt_pods(self, job_id: str, attempt: int) -> list[PodView]:
        return sorted((p for p in self.pods.values()
                       if p.job_id == job_id and p.attempt == attempt), key=lambda p: p.name)

    def diagnose(self, job_id: str, attempt: int) -> str:
        """'2/3 pods ready; rm-x-worker-abc: Unschedulable: 0/4 nodes ...' for messages."""
        pods = self.attempt_pods(job_id, attempt)
        if not pods:
            return "no pods created yet (is the KubeRay operator running?)"
        ready = sum(p.ready for p in pods)
        stuck = [f"{p.name}: {p.waiting}" for p in pods if not p.ready and p.waiting]
        return "; ".join([f"{ready}/{len(pods)} pods ready", *stuck[:3]])
