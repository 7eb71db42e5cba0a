"""The controller under faults and hostile clients (issue 23): Redis stopped and killed,
slow headers and bodies, too many connections, file modes, data roots.

Real controllers (embedded Redis, FakeLauncher, uvicorn configured as `ringmaster serve`
configures it) on loopback. Nothing here asserts a duration: waits are bounded by
generous deadlines, and what is asserted is the outcome (a 503 rather than a hang, a
closed socket, a restarted server).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

from controller.http_server import HttpLimits
from scheduler.synth import synthesize
from tests.controller.harness import DEMO_SPEC, running_controller


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_directory_is_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as an older version (or a umask of 022) left it
    with running_controller(state, token="t") as h:
        h.controller.write_endpoint(h.url)
        h.controller.store.r.save()  # redis.db exists only after a snapshot
        assert mode(state) == 0o700
        for name in ("redis.db", "appendonly.aof", "redis.db.settings", "controller.json"):
            assert mode(state / name) == 0o600, name


@pytest.fixture
def harness(tmp_path):
    with running_controller(tmp_path / "state") as h:
        yield h


def test_a_stopped_redis_is_a_prompt_503_and_readyz_says_no_more(harness):
    pid = harness.controller.redis.server_pid
    c, anon = harness.client(), harness.client(None)
    job_id = c.post("/v1/jobs", json=DEMO_SPEC).json()["id"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The client waits 30 s; the controller's own Redis timeouts answer long before.
        for r in (c.get(f"/v1/jobs/{job_id}"), c.post("/v1/jobs", json=DEMO_SPEC)):
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
        ready = anon.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "detail": "job store unavailable"}
        assert "sock" not in ready.text and "redis" not in ready.text.lower()
        told = c.get("/readyz").json()["detail"]  # a token holder learns why
        assert told.startswith("job store unavailable: ") and len(told) > 24
        assert anon.get("/healthz").status_code == 200  # liveness does not need Redis
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: anon.get("/readyz").status_code == 200, 60, "ready again")
    assert c.get(f"/v1/jobs/{job_id}").status_code == 200


def test_a_killed_redis_is_restarted_and_readiness_recovers(harness):
    ctl, anon, c = harness.controller, harness.client(None), harness.client()
    job_id = c.post("/v1/jobs", json=DEMO_SPEC).json()["id"]
    ctl.store.append_logs(job_id, ["before the crash"], rank=0)
    old = ctl.redis.server_pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: ctl.redis.server_pid != old and anon.get("/readyz").status_code == 200,
               120, "the controller restarting its Redis")
    assert ctl.redis.restarts == 1
    job = c.get(f"/v1/jobs/{job_id}").json()  # replayed from the append-only file
    assert job["phase"] == "Pending"
    logs = c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 5}).json()
    assert [x["text"] for x in logs["lines"]] == ["before the crash"]
    assert c.post("/v1/jobs", json=DEMO_SPEC).status_code == 201  # writes work again
    ctl.machine.tick(), ctl.machine.tick()  # so does the state machine
    assert c.get(f"/v1/jobs/{job_id}").json()["phase"] == "Running"


def raw(url: str, timeout_s: float = 60.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_slow_headers_and_bodies_are_cut_off(tmp_path):
    limits = HttpLimits(header_timeout_s=1.0)
    with running_controller(tmp_path / "state", http=limits, body_timeout_s=1.0) as h:
        silent = raw(h.url)  # connects, never sends a byte
        half_headers = raw(h.url)
        half_headers.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        half_body = raw(h.url)
        half_body.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 1000\r\n\r\n{\"name\": ")
        # recv() returns b"" once the server closes; the 60 s socket timeout would raise.
        assert read_all(silent) == b""
        assert read_all(half_headers) == b""
        answer = read_all(half_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
        kept = raw(h.url)  # a request that completes in time is served as usual
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(kept).startswith(b"HTTP/1.1 200 ")
        for s in (silent, half_headers, half_body, kept):
            s.close()


def test_connections_over_the_cap_get_503(tmp_path):
    with running_controller(tmp_path / "state", http=HttpLimits(max_connections=4,
                                                                 header_timeout_s=60)) as h:
        held = [raw(h.url) for _ in range(4)]
        r = httpx.get(f"{h.url}/healthz", timeout=30)
        assert r.status_code == 503
        for s in held:
            s.close()
        wait_until(lambda: httpx.get(f"{h.url}/healthz", timeout=30).status_code == 200, 60,
                   "capacity back once the held connections closed")


def test_data_roots_confine_paths_without_telling_what_exists(tmp_path):
    root = tmp_path / "data"
    synthesize(root / "ds", distribution="uniform", num_samples=8, max_length=64, seed=1)
    (root / "escape").symlink_to("/etc")
    with running_controller(tmp_path / "state", data_roots=(root,)) as h:
        c = h.client()

        def submit(**paths):
            body = {**DEMO_SPEC, "dataset": {"path": paths.pop("dataset", str(root / "ds"))}}
            if "model" in paths:
                body["model"] = paths["model"]
            if "ckpt" in paths:
                body["training"] = {**DEMO_SPEC["training"], "checkpoint_dir": paths["ckpt"]}
            return c.post("/v1/jobs", json=body), c.post("/v1/jobs:plan", json=body)

        ok, _ = submit()
        assert ok.status_code == 201
        # Inside the roots a missing dataset is the dataset's own error (a 422 naming it).
        missing = submit(dataset=str(root / "ds" / "new" / "x"))[0]
        assert missing.status_code == 422
        assert missing.json()["error"]["details"][0]["field"] == "dataset.path"
        assert "not found" in missing.json()["error"]["message"]
        outside = {"dataset": ["/etc/passwd", "/etc/no-such-file", f"{root}/../../etc/passwd",
                               str(root / "escape" / "passwd"), "relative/../../x"],
                   "model": ["/etc/config.json"], "ckpt": ["/tmp/elsewhere"]}
        for key, values in outside.items():
            for value in values:
                for r in submit(**{key: value}):
                    assert r.status_code == 422, (key, value, r.text)
                    err = r.json()["error"]
                    field = {"dataset": "dataset.path", "model": "model",
                             "ckpt": "training.checkpoint_dir"}[key]
                    assert err["details"][0]["field"] == field
                    assert err["message"] == (f"{field}: {value!r} is outside the "
                                              f"controller's data roots ({root.resolve()})")
