"""Leader election over a `coordination.k8s.io` Lease, for more than one controller replica.

Only the leader runs the job state machine (admits, launches, reconciles, stops workers)
and the workers' gRPC service; the other replicas serve the REST API (reads, submissions,
stop requests: all go through the store) and take over within a lease period when the
leader stops renewing. The algorithm is client-go's: a candidate trusts its own clock
only, so clock skew between nodes does not matter. A lease counts as expired when its
record (holder, renew time, ...) has not changed for `leaseDurationSeconds` since this
process last saw it change. The leader renews every retry period and steps down when it
has not renewed for `renew_deadline_s`, which is shorter than the lease, so it stops
acting before anyone else may start. Every write carries the resourceVersion it read
(optimistic concurrency, a 409 for the loser), so two candidates never both win.

The leader also points the `<release>-leader` Service at itself
(`publish_leader_endpoint`: one EndpointSlice with its pod IP), so worker gRPC reaches
the leader only. API verbs are exactly `LEADER_RBAC_RULES` (the chart's Role grants them).

Threads: `start()` runs the renew loop on one daemon thread; role changes are handed, in
order, to a second thread that calls `on_change(leading)`, so a slow take-over (the
launcher listing its RayClusters) never delays a renewal. No lock is held across an API
call. The Kubernetes client is injected (`coordination_api`); the default uses the pod's
service account.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controller.launchers.kuberay import RbacRule
from scheduler.errors import SpecError

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
ENDPOINT_MANAGER = "ringmaster.io/leader-election"  # EndpointSlice managed-by label
LEADER_RBAC_RULES: tuple[RbacRule, ...] = (
    RbacRule(api_group="coordination.k8s.io", resource="leases", verbs=("create",)),
    RbacRule(api_group="coordination.k8s.io", resource="leases", verbs=("get", "update"),
             named=True),
    RbacRule(api_group="discovery.k8s.io", resource="endpointslices", verbs=("create",)),
    RbacRule(api_group="discovery.k8s.io", resource="endpointslices",
             verbs=("get", "update"), named=True),
)


@dataclass(frozen=True, kw_only=True)
class LeaderElectionConfig:
    """Which Lease the replicas compete for and how fast a dead leader is replaced."""

    lease_name: str  # the Lease (and leader Service) name: <release>-leader
    namespace: str  # the release namespace
    identity: str  # this replica (its pod name)
    lease_duration_s: float = 15.0  # a silent leader is replaced after this long
    renew_deadline_s: float = 10.0  # the leader steps down when it could not renew this long
    retry_period_s: float = 2.0  # between two tries to acquire or renew
    service_name: str = ""  # selector-less Service workers dial ("": publish nothing)
    pod_ip: str = ""  # this replica's address in that Service's EndpointSlice
    api_timeout_s: float = 5.0  # bound on one API request (below the renew deadline)

    def __post_init__(self) -> None:
        for name in ("lease_name", "namespace", "identity"):
            if not getattr(self, name):
                raise SpecError(f"leader election: {name} must not be empty")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise SpecError(
                f"leader election: need 0 < retry_period_s ({self.retry_period_s:g}) < "
                f"renew_deadline_s ({self.renew_deadline_s:g}) < lease_duration_s "
                f"({self.lease_duration_s:g}), so a leader steps down before it is replaced")
        if self.service_name and not self.pod_ip:
            raise SpecError("leader election: service_name needs pod_ip (RINGMASTER_POD_IP)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LeaderElectionConfig | None:
        """The RINGMASTER_LEADER_* variables the chart sets; None when election is off."""
        env = os.environ if env is None else env
        lease = env.get("RINGMASTER_LEADER_ELECTION_LEASE", "")
        if not lease:
            return None
        timing = {}
        for field, var in (("lease_duration_s", "RINGMASTER_LEADER_ELECTION_LEASE_DURATION_S"),
                           ("renew_deadline_s", "RINGMASTER_LEADER_ELECTION_RENEW_DEADLINE_S"),
                           ("retry_period_s", "RINGMASTER_LEADER_ELECTION_RETRY_PERIOD_S")):
            raw = env.get(var)
            if raw:
                try:
                    timing[field] = float(raw)
                except ValueError:
                    raise SpecError(f"{var}={raw!r} is not a number") from None
        return cls(lease_name=lease, namespace=env.get("RINGMASTER_LEADER_ELECTION_NAMESPACE")
                   or _own_namespace(), identity=env.get("RINGMASTER_POD_NAME")
                   or socket.gethostname(), service_name=env.get("RINGMASTER_LEADER_SERVICE",
                                                                 ""),
                   pod_ip=env.get("RINGMASTER_POD_IP", ""), **timing)


def _own_namespace() -> str:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip()
    except OSError:
        raise SpecError("RINGMASTER_LEADER_ELECTION_NAMESPACE is not set and this is not a "
                        f"pod ({SA_NAMESPACE_FILE} is missing)") from None


def _status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _micro_time(unix_s: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _default_apis() -> tuple[object, object, Callable[[Any], Any]]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.ApiClient()
    return (client.CoordinationV1Api(api), client.DiscoveryV1Api(api),
            api.sanitize_for_serialization)


class LeaderElector:
    """Competes for the Lease; see the module docstring. `step()` is one try (tests drive
    it with their own clock); `start()` runs it every retry period."""

    def __init__(self, config: LeaderElectionConfig, *,
                 on_change: Callable[[bool], None] = lambda leading: None,
                 coordination_api=None, discovery_api=None,
                 serialize: Callable[[Any], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.config = config
        if coordination_api is None:
            coordination_api, discovery_api, serialize = _default_apis()
        self.api, self.discovery_api = coordination_api, discovery_api
        self.serialize = serialize or (lambda obj: obj)
        self.on_change, self.clock, self.wall = on_change, clock, wall
        self._leading = False
        self._observed: tuple | None = None  # the lease record as last seen changing
        self._observed_at = 0.0
        self._last_renew: float | None = None  # our last successful write (monotonic)
        self._timeout = {"_request_timeout": config.api_timeout_s}
        self._closed = threading.Event()
        self._changes: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def is_leader(self) -> bool:
        return self._leading

    def step(self) -> bool:
        """Try once to acquire or renew; report a change of role; True while leading."""
        leading = self._try()
        if leading != self._leading:
            self._leading = leading
            log.info("%s %s leadership of lease %s/%s", self.config.identity,
                     "took" if leading else "lost", self.config.namespace,
                     self.config.lease_name)
            self._changes.put(leading)
        return leading

    def _try(self) -> bool:
        now = self.clock()
        try:
            lease = self._read()
        except Exception as exc:  # API server away: keep leading until the renew deadline
            log.warning("reading lease %s failed: %s", self.config.lease_name, exc)
            return self._within_deadline(now)
        if lease is None:
            return self._write(None, now)
        spec = lease.get("spec") or {}
        record = tuple(spec.get(k) for k in ("holderIdentity", "renewTime", "acquireTime",
                                             "leaseDurationSeconds", "leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds") or self.config.lease_duration_s
        if holder and holder != self.config.identity and now < self._observed_at + duration:
            return False  # someone else holds a lease that is still alive
        return self._write(lease, now)

    def _within_deadline(self, now: float) -> bool:
        return self._leading and self._last_renew is not None and \
            now - self._last_renew < self.config.renew_deadline_s

    def _read(self) -> dict | None:
        try:
            return self.serialize(self.api.read_namespaced_lease(
                self.config.lease_name, self.config.namespace, **self._timeout))
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise

    def _body(self, lease: dict | None, *, holder: str, duration_s: float) -> dict:
        old = (lease or {}).get("spec") or {}
        now = _micro_time(self.wall())
        spec = {**old, "holderIdentity": holder, "leaseDurationSeconds": int(duration_s),
                "renewTime": now}
        if old.get("holderIdentity") != holder and holder:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + (1 if lease
                                                                                 else 0)
        meta: dict[str, Any] = {"name": self.config.lease_name, "namespace": self.config.namespace,
                "labels": {"app.kubernetes.io/part-of": "ringmaster",
                           "app.kubernetes.io/managed-by": "ringmaster-controller"}}
        if lease is not None:
            meta["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                "spec": spec}

    def _write(self, lease: dict | None, now: float) -> bool:
        body = self._body(lease, holder=self.config.identity,
                          duration_s=self.config.lease_duration_s)
        try:
            if lease is None:
                self.api.create_namespaced_lease(self.config.namespace, body, **self._timeout)
            else:
                self.api.replace_namespaced_lease(self.config.lease_name,
                                                  self.config.namespace, body, **self._timeout)
        except Exception as exc:
            if _status(exc) == 409:  # another replica wrote first: it leads
                return False
            log.warning("writing lease %s failed: %s", self.config.lease_name, exc)
            return self._within_deadline(now)
        self._last_renew = now
        return True

    def release(self) -> None:
        """Give the lease up (a clean shutdown): a standby takes over at its next try."""
        if not self._leading:
            return
        try:
            lease = self._read()
            if lease and (lease.get("spec") or {}).get("holderIdentity") == \
                    self.config.identity:
                self.api.replace_namespaced_lease(
                    self.config.lease_name, self.config.namespace,
                    self._body(lease, holder="", duration_s=1), **self._timeout)
        except Exception as exc:
            log.warning("releasing lease %s failed (%s); it expires by itself",
                        self.config.lease_name, exc)
        self._leading = False
        self._changes.put(False)

    def publish_endpoint(self, port: int) -> None:
        """Point the leader Service at this replica (when the config names one)."""
        if self.config.service_name:
            publish_leader_endpoint(self.discovery_api, self.config, port=port,
                                    serialize=self.serialize)

    # threads ------------------------------------------------------------------------------
    def start(self) -> LeaderElector:
        for target, name in ((self._renew_loop, "leader-election"),
                             (self._role_loop, "leader-role")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _renew_loop(self) -> None:
        while not self._closed.is_set():
            try:
                self.step()
            except Exception:  # a bug here must not end elections silently
                log.exception("leader election step failed")
            self._closed.wait(self.config.retry_period_s)

    def _role_loop(self) -> None:
        while True:
            leading = self._changes.get()
            if leading is None:
                return
            try:
                self.on_change(leading)
            except Exception:
                log.exception("leader role change to %s failed",
                              "leader" if leading else "standby")

    def close(self) -> None:
        """Stop competing; a leader releases the lease and steps down first."""
        self._closed.set()
        if self._threads:
            self._threads[0].join(timeout=self.config.api_timeout_s * 2 + 1)
        self.release()
        self._changes.put(None)
        for t in self._threads[1:]:
            t.join(timeout=30)


def publish_leader_endpoint(discovery_api, config: LeaderElectionConfig, *, port: int,
                            serialize: Callable[[Any], Any] = lambda obj: obj) -> None:
    """Point the leader Service at this replica: its one EndpointSlice lists our pod IP."""
    name, ns = config.service_name, config.namespace
    body: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": ENDPOINT_MANAGER,
                                "app.kubernetes.io/part-of": "ringmaster"}},
        "addressType": "IPv6" if ":" in config.pod_ip else "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [config.pod_ip], "conditions": {"ready": True},
                       "targetRef": {"kind": "Pod", "name": config.identity,
                                     "namespace": ns}}],
    }
    timeout = {"_request_timeout": config.api_timeout_s}
    try:
        current = serialize(discovery_api.read_namespaced_endpoint_slice(name, ns, **timeout))
    except Exception as exc:
        if _status(exc) != 404:
            raise
        discovery_api.create_namespaced_endpoint_slice(ns, body, **timeout)
        return
    body["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get(
        "resourceVersion")
    discovery_api.replace_namespaced_endpoint_slice(name, ns, body, **timeout)
    log.info("leader Service %s/%s now points at %s:%d", ns, name, config.pod_ip, port)
