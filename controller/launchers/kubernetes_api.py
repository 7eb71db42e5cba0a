"""The Kubernetes launcher's side of the API server: its clients and its pod watch.

`Clients` holds what the launcher is given (`kubernetes` client objects in a pod, fakes in
tests); `default_clients()` builds the real ones from the in-cluster service account (or
a developer's kubeconfig), importing the client libraries only then, so importing the
launcher loads neither `kubernetes` nor `ray`.

`PodWatch` runs one thread per namespace that lists and watches this controller's pods
(label selector on `ringmaster.io/owner`) and queues what it sees; the launcher's `poll()`
drains the queue on the state machine's thread. The watch threads share nothing else with
the launcher: no lock, only that queue.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RESYNC = "RESYNC"  # a queued (kind, object) after a list: {"namespace", "pods"}


@dataclass(kw_only=True)
class Clients:
    # Dynamic client objects (kubernetes' are untyped; tests pass fakes) and plain dicts.
    custom: Any  # kubernetes.client.CustomObjectsApi (or a fake)
    core: Any  # kubernetes.client.CoreV1Api
    ray_jobs: Callable[[str], Any]  # dashboard URL -> JobSubmissionClient
    watch_factory: Callable[[], Any]  # -> kubernetes.watch.Watch
    serialize: Callable[[Any], Any] = field(default=lambda obj: obj)


def default_clients() -> Clients:
    from kubernetes import client, config, watch

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # A developer's kubeconfig, outside a cluster ($KUBECONFIG as it is now, not as it
        # was when the kubernetes package was imported).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.ApiClient()

    def ray_jobs(address: str):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(address)

    return Clients(custom=client.CustomObjectsApi(api), core=client.CoreV1Api(api),
                   ray_jobs=ray_jobs, watch_factory=watch.Watch,
                   serialize=api.sanitize_for_serialization)


def api_status(exc: Exception) -> int | None:
    """The HTTP status of an ApiException (None for other errors)."""
    return getattr(exc, "status", None)


def api_message(exc: Exception) -> str:
    """The API server's own words from an ApiException (its Status body), else the error."""
    try:
        return json.loads(getattr(exc, "body", "") or "{}").get("message") or str(exc)
    except (TypeError, ValueError):
        return str(exc)


class PodWatch:
    """List + watch of this controller's pods, one thread per namespace (module docstring)."""

    def __init__(self, clients: Clients, *, selector: str, request_timeout: dict):
        self.clients, self.selector, self.request_timeout = clients, selector, request_timeout
        self.events: queue.SimpleQueue[tuple[str, dict]] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self._watches: list[Any] = []
        self._closed = threading.Event()

    def start(self, namespaces: tuple[str, ...]) -> None:
        for ns in namespaces:
            t = threading.Thread(target=self._loop, args=(ns,), daemon=True,
                                 name=f"pod-watch-{ns}")
            t.start()
            self.threads.append(t)

    def sync(self, namespace: str, *, timeout_s: int = 300) -> None:
        """One list + one watch pass over this controller's pods in `namespace`.

        Events are queued; a pod that vanished while nobody watched (missing from the
        list) counts as deleted when the tracker reads the RESYNC.
        """
        core = self.clients.core
        listing = self.clients.serialize(core.list_namespaced_pod(
            namespace, label_selector=self.selector, **self.request_timeout))
        pods = listing.get("items") or []
        self.events.put((RESYNC, {"namespace": namespace, "pods": pods}))
        version = (listing.get("metadata") or {}).get("resourceVersion")
        w = self.clients.watch_factory()
        self._watches.append(w)
        try:
            for ev in w.stream(core.list_namespaced_pod, namespace=namespace,
                               label_selector=self.selector, resource_version=version,
                               timeout_seconds=timeout_s):
                if self._closed.is_set():
                    break
                if ev.get("type") == "ERROR":  # e.g. 410 Gone: our version is too old; relist
                    break
                pod = ev.get("raw_object") or self.clients.serialize(ev["object"])
                self.events.put((ev["type"], pod))
        finally:
            w.stop()
            self._watches.remove(w)

    def drain(self) -> list[tuple[str, dict]]:
        """What the watches queued since the last call, oldest first."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed.set()
        for w in list(self._watches):
            w.stop()
        for t in self.threads:
            t.join(timeout=5)

    def _loop(self, namespace: str) -> None:
        backoff = 1.0
        while not self._closed.is_set():
            began = time.monotonic()
            try:
                self.sync(namespace)
                backoff = 1.0
                if time.monotonic() - began < 1.0:  # a server closing watches at once:
                    self._closed.wait(1.0)  # relist at most once a second
            except Exception as exc:  # API server restart, expired token, network
                log.warning("pod watch in %s failed (%s); retrying in %.0f s", namespace, exc,
                            backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 60.0)


__all__ = ["Clients", "PodWatch", "api_message", "api_status", "default_clients"]
