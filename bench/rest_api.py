"""Benchmark of the controller's REST API (issue 8): submit and GET latency under load.

Starts a real controller (`ringmaster serve --launcher fake`, embedded Redis in a temporary
state directory, reconciler running) as a subprocess on a loopback port, then drives it
from this process with asyncio + httpx: C concurrent clients, each sending its requests
back to back. Reports p50/p99/max latency and throughput of POST /v1/jobs at 1, 10 and 50
clients, and of GET /v1/jobs/{id} and GET /v1/jobs?limit=50 at 1 and 10 clients.

    .venv/bin/python -m bench.rest_api [--requests 300] [--clients 1 10 50]
    .venv/bin/python -m bench.rest_api --peer ray [--clients 1 10]

With `--peer ray` the same run also starts a local Ray head (`ray start --head --block`,
dashboard and its job server on loopback, in a session of its own that is terminated at
the end; never `ray stop`, which would stop every Ray of this user) and drives the Ray
Jobs REST API with the same clients: POST /api/jobs/ (entrypoint `true`: Ray starts a
supervisor actor per job, our fake launcher starts nothing, so `--peer-submits` keeps that
row short), GET /api/jobs/{submission_id} and GET /api/jobs/ (every job: that API does not
page). The two servers run one after the other on the same machine in one run.

Prints a markdown table (the one recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from controller.testing import free_port, start_controller


def job_spec(dataset: Path) -> dict:
    """The submitted job (submit validates its dataset: a small real one)."""
    return {"name": "bench", "model": "tiny", "dataset": {"path": str(dataset)},
            "resources": {"num_ranks": 4, "cluster": "cpu"},
            "training": {"steps": 10, "global_batch_tokens": 4096}}


async def drive(url: str, token: str, clients: int, total: int, request) -> tuple[list, float]:
    """`clients` tasks share `total` requests; returns per-request seconds and wall time."""
    latencies: list[float] = []
    per_client = max(1, total // clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=60, limits=limits) as http:
        async def one_client(k: int) -> None:
            for i in range(per_client):
                t0 = time.perf_counter()
                r = await request(http, k, i)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code < 300, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        return latencies, time.perf_counter() - t0


def row(what: str, clients: int, lat: list[float], wall: float) -> str:
    ms = np.asarray(lat) * 1e3
    return (f"| {what} | {clients} | {len(ms)} | {np.percentile(ms, 50):.1f} | "
            f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {len(ms) / wall:.0f} |")


async def run(url: str, token: str, args, spec: dict) -> list[str]:
    rows = []
    for c in args.clients:
        lat, wall = await drive(url, token, c, args.requests, lambda h, k, i, c=c: h.post(
            "/v1/jobs", json={**spec, "submission_id": f"c{c}-{k}-{i}"}))
        rows.append(row("POST /v1/jobs", c, lat, wall))
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}
                                 ) as http:
        job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
    for c in [c for c in args.clients if c <= 10]:
        lat, wall = await drive(url, token, c, args.requests,
                                lambda h, k, i: h.get(f"/v1/jobs/{job_id}"))
        rows.append(row("GET /v1/jobs/{id}", c, lat, wall))
        lat, wall = await drive(url, token, c, args.requests // 2,
                                lambda h, k, i: h.get("/v1/jobs", params={"limit": 50}))
        rows.append(row("GET /v1/jobs?limit=50", c, lat, wall))
    return rows


def start_ray_head(tmp: Path, port: int, dashboard_port: int, token: str) -> subprocess.Popen:
    """A Ray head with its dashboard (the Jobs API) on loopback, in its own session; its
    token authentication (Ray's default) uses `token`, as ours uses our API token."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--head", "--block", "--port", str(port), "--node-ip-address",
           "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port",
           str(dashboard_port), "--include-dashboard", "true", "--num-cpus", "2",
           "--disable-usage-stats", "--object-store-memory", "100000000"]
    # A private RAY_TMPDIR: `ray start` leaves its address file there, and a later
    # `ray.init()` of anyone sharing the directory would try to join this dead cluster.
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2,
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_session(proc)
    raise RuntimeError("ray head (dashboard) did not start")


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this benchmark started (then SIGKILL if it lingers)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=60)  # Ray drains for up to 30 s on SIGTERM
            return
        except subprocess.TimeoutExpired:
            continue


async def run_ray(url: str, token: str, args) -> list[str]:
    """The Ray Jobs REST API, the same clients as `run` (after one accepted submission:
    the head answers 503 until its dashboard agent is up)."""
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        deadline = time.monotonic() + 300
        while (r := await http.post("/api/jobs/", json={"entrypoint": "true"})).is_error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray refuses job submissions: {r.text}")
            await asyncio.sleep(1)
        sub = r.json()
    rows = []
    for c in args.clients:
        lat, wall = await drive(url, token, c, args.peer_submits, lambda h, k, i, c=c: h.post(
            "/api/jobs/", json={"entrypoint": "true", "submission_id": f"c{c}-{k}-{i}"}))
        rows.append(row("Ray POST /api/jobs/", c, lat, wall))
    for c in [c for c in args.clients if c <= 10]:
        lat, wall = await drive(url, token, c, args.requests,
                                lambda h, k, i: h.get(f"/api/jobs/{sub['submission_id']}"))
        rows.append(row("Ray GET /api/jobs/{id}", c, lat, wall))
        lat, wall = await drive(url, token, c, args.requests // 2,
                                lambda h, k, i: h.get("/api/jobs/"))
        rows.append(row("Ray GET /api/jobs/ (all)", c, lat, wall))
    return rows


def ours(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        from scheduler.synth import synthesize

        synthesize(Path(tmp) / "data", distribution="uniform", num_samples=64, max_length=400,
                   seed=3)
        port = args.port or free_port()
        proc = start_controller(Path(tmp) / "state", port)
        try:
            token = (Path(tmp) / "state" / "token").read_text().strip()
            return asyncio.run(run(f"http://127.0.0.1:{port}", token, args,
                                   job_spec(Path(tmp) / "data")))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def ray_peer(args) -> list[str]:
    # Short: Ray's unix sockets under RAY_TMPDIR must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="rmray-", dir="/tmp") as tmp:
        dash = args.ray_dashboard_port or free_port()
        token = secrets.token_hex(16)
        head = start_ray_head(Path(tmp), args.ray_port or free_port(), dash, token)
        try:
            return asyncio.run(run_ray(f"http://127.0.0.1:{dash}", token, args))
        finally:
            stop_session(head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="Requests per measurement.")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--peer", choices=["ray"], default=None,
                    help="Also measure the Ray Jobs API in the same run.")
    ap.add_argument("--peer-submits", type=int, default=50,
                    help="Ray job submissions per row (each starts a supervisor actor).")
    ap.add_argument("--port", type=int, default=0, help="Our REST port (0: a free one).")
    ap.add_argument("--ray-port", type=int, default=0, help="Ray GCS port (0: a free one).")
    ap.add_argument("--ray-dashboard-port", type=int, default=0,
                    help="Ray dashboard / Jobs API port (0: a free one).")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = ours(args)
    if args.peer == "ray":
        rows += ray_peer(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; load {load:.1f} -> {os.getloadavg()[0]:.1f}; "
          "servers and clients share the machine\n")
    print("| request | clients | n | p50 ms | p99 ms | max ms | req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
