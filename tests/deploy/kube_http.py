"""A minimal Kubernetes API server over HTTP, for driving the real `kubernetes` client.

It serves only the paths the launcher and the leader election use (RayClusters in
ray.io/v1, pods in v1, list and watch; Secrets in v1, create and delete; Leases and
EndpointSlices with resourceVersions and 409 on a stale one) from in-memory dicts, and
records each request as (api_group, resource, verb) the way the API server's authorizer
would see it. A watch request streams the queued events as newline-delimited JSON and
closes. Plain http on 127.0.0.1, one thread per request.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CLUSTERS = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayclusters(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
SECRETS = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?$")
VERSIONED = re.compile(r"^/apis/(coordination\.k8s\.io|discovery\.k8s\.io)/v1/namespaces/"
                       r"([^/]+)/(leases|endpointslices)(?:/([^/]+))?$")


def _selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in
               (p.split("=", 1) for p in selector.split(",") if p))


class KubeHttp:
    """State and server; `url` is what a kubeconfig points at."""

    def __init__(self):
        self.clusters: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.secrets: dict[tuple[str, str], dict] = {}
        self.watch_events: list[dict] = []
        self.versioned: dict[tuple[str, str, str], dict] = {}  # (resource, ns, name) -> obj
        self.version = 1000
        self.calls: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KubeHttp:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]})

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return None

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, what: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404, "message": what})

            def _versioned(self, m, verb: str, body: dict | None = None):
                group, ns, resource, name = m.groups()
                with api.lock:
                    api.calls.append((group, resource, verb))
                    key = (resource, ns, name or (body or {}).get("metadata", {}).get("name"))
                    current = api.versioned.get(key)
                    if verb == "get":
                        return self._send(200, current) if current else \
                            self._not_found(f"{resource} {key[2]!r} not found")
                    if verb == "create" and current is not None:
                        return self._send(409, {"kind": "Status", "reason": "AlreadyExists",
                                                "code": 409})
                    if verb == "update":
                        if current is None:
                            return self._not_found(f"{resource} {key[2]!r} not found")
                        if body["metadata"].get("resourceVersion") != \
                                current["metadata"]["resourceVersion"]:
                            return self._send(409, {"kind": "Status", "reason": "Conflict",
                                                    "code": 409})
                    api.version += 1
                    body["metadata"]["resourceVersion"] = str(api.version)
                    api.versioned[key] = body
                self._send(201 if verb == "create" else 200, body)

            def do_PUT(self):
                m = VERSIONED.match(urlparse(self.path).path)
                return self._versioned(m, "update", self._body())

            def do_POST(self):
                if (v := VERSIONED.match(urlparse(self.path).path)) is not None:
                    return self._versioned(v, "create", self._body())
                path, body = urlparse(self.path).path, self._body()
                if (m := SECRETS.match(path)) is not None:
                    return self._store_secret(m.group(1), body)
                m = CLUSTERS.match(path)
                with api.lock:
                    api.calls.append(("ray.io", "rayclusters", "create"))
                    key = (m.group(1), body["metadata"]["name"])
                    if key in api.clusters:
                        return self._send(409, {"kind": "Status", "reason": "AlreadyExists",
                                                "code": 409})
                    api.clusters[key] = body
                self._send(201, body)

            def _store_secret(self, namespace: str, body: dict):
                with api.lock:
                    api.calls.append(("", "secrets", "create"))
                    key = (namespace, body["metadata"]["name"])
                    if key in api.secrets:
                        return self._send(409, {"kind": "Status", "reason": "AlreadyExists",
                                                "code": 409})
                    api.secrets[key] = body
                self._send(201, body)

            def do_DELETE(self):
                path = urlparse(self.path).path
                group, resource, objects, m = "ray.io", "rayclusters", api.clusters, \
                    CLUSTERS.match(path)
                if m is None:
                    group, resource, objects, m = "", "secrets", api.secrets, SECRETS.match(path)
                with api.lock:
                    api.calls.append((group, resource, "delete"))
                    gone = objects.pop((m.group(1), m.group(2)), None)
                if gone is None:
                    return self._not_found(f"{resource} not found")
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if (m := CLUSTERS.match(url.path)) is not None:
                    return self._clusters(m, query)
                if (m := PODS.match(url.path)) is not None:
                    return self._pods(m.group(1), query)
                if (m := VERSIONED.match(url.path)) is not None:
                    return self._versioned(m, "get")
                self._not_found(url.path)

            def _clusters(self, m, query):
                ns, name = m.group(1), m.group(2)
                with api.lock:
                    if name:
                        api.calls.append(("ray.io", "rayclusters", "get"))
                        obj = api.clusters.get((ns, name))
                        return self._send(200, obj) if obj else self._not_found(name)
                    api.calls.append(("ray.io", "rayclusters", "list"))
                    items = [c for (n, _), c in api.clusters.items()
                             if n == ns and _selected(c, query.get("labelSelector", ""))]
                self._send(200, {"apiVersion": "ray.io/v1", "kind": "RayClusterList",
                                 "metadata": {"resourceVersion": "7"}, "items": items})

            def _pods(self, ns, query):
                selector = query.get("labelSelector", "")
                if query.get("watch") in ("true", "True", "1"):
                    with api.lock:
                        api.calls.append(("", "pods", "watch"))
                        events, api.watch_events = api.watch_events, []
                    lines = b"".join(json.dumps(e).encode() + b"\n" for e in events
                                     if _selected(e["object"], selector))
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(lines)))
                    self.end_headers()
                    self.wfile.write(lines)
                    return None
                with api.lock:
                    api.calls.append(("", "pods", "list"))
                    items = [p for (n, _), p in api.pods.items()
                             if n == ns and _selected(p, selector)]
                self._send(200, {"apiVersion": "v1", "kind": "PodList",
                                 "metadata": {"resourceVersion": "7"}, "items": items})

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

        return Handler
