"""One attempt of the Kubernetes launcher: its phase, what the launcher keeps of it, and
how a RayCluster found on the API server (after a controller restart) becomes one again.

Phases of an attempt (`Phase`; the values are plain strings, as they always were):

    [queued ->] provisioning -> running -> stopping      (lost: after WORKER_LOST)

`queued` clusters exist suspended, waiting for Kueue to lift `spec.suspend`;
`provisioning` waits for KubeRay to report the cluster ready; `running` follows the
driver's Ray job; `stopping` waits for the API server to forget a cluster we deleted;
`lost` waits for the state machine's stop(). Pure: no API calls, no locks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from controller.launchers.kuberay import LABEL_ATTEMPT, LABEL_JOB, cluster_name, is_suspended

log = logging.getLogger(__name__)


class Phase(StrEnum):
    """Where an attempt is in its lifecycle (see the module docstring)."""

    QUEUED = "queued"  # created suspended: waits for Kueue's admission
    PROVISIONING = "provisioning"  # waits for KubeRay's readiness, then submits the driver
    RUNNING = "running"  # the driver runs; its Ray job status is followed
    STOPPING = "stopping"  # deleted by this launcher; STOPPED once the API server agrees
    LOST = "lost"  # WORKER_LOST reported once; the state machine's stop() tears it down


@dataclass(kw_only=True)
class Attempt:
    """One attempt the launcher is running or tearing down."""

    job_id: str
    attempt: int
    namespace: str
    name: str  # RayCluster name
    num_gpus: int  # what admission counts
    phase: Phase = Phase.PROVISIONING
    deadline: float = 0.0  # provisioning: when readiness times out
    next_check: float = 0.0  # earliest time of the next API check
    # queued (suspended, waiting for Kueue): created by admit() before start() was called
    started: bool = True
    admitted: bool = False  # Kueue lifted spec.suspend

    @property
    def submission_id(self) -> str:
        """The driver's Ray job id: deterministic, so a restarted controller never
        submits the same attempt twice."""
        return f"{self.name}-driver"


def is_ready(obj: dict) -> bool:
    """KubeRay says the RayCluster is up (`status.state` or, in newer KubeRay, the
    `RayClusterProvisioned` condition)."""
    status = obj.get("status") or {}
    if str(status.get("state", "")).lower() == "ready":
        return True
    return any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
               for c in status.get("conditions") or [])


def attempt_from(obj: dict, namespace: str, *, deadline: float) -> Attempt | None:
    """The attempt a RayCluster of ours stands for (its job/attempt labels), in the phase
    its object shows: being deleted, still in Kueue's queue, or provisioning with a fresh
    readiness `deadline` (a running driver is found by its submission id). None, with a
    warning, for a cluster that carries our owner label but not the others."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        job_id, attempt = labels[LABEL_JOB], int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        log.warning("RayCluster %s/%s carries our owner label but no job/attempt labels; "
                    "leaving it alone", namespace, meta.get("name"))
        return None
    groups = (obj.get("spec") or {}).get("workerGroupSpecs") or []
    gpus = sum(int(g.get("replicas", 0)) * int(g.get("rayStartParams", {})
                                                .get("num-gpus", 0)) for g in groups)
    a = Attempt(job_id=job_id, attempt=attempt, namespace=namespace,
                name=meta.get("name", cluster_name(job_id, attempt)), num_gpus=gpus,
                deadline=deadline)
    if meta.get("deletionTimestamp"):
        a.phase = Phase.STOPPING
    elif is_suspended(obj):  # still in Kueue's queue: admit() asks about it again
        a.phase, a.started = Phase.QUEUED, False
    return a


__all__ = ["Attempt", "Phase", "attempt_from", "is_ready"]
