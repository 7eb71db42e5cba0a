"""From one box to a cluster (issue 19): a real two-node Ray cluster on this machine.

A head and a second node, each started with `ray start` and its own resources (2 CPUs and
a marker resource each), loopback ports picked here. A controller with the Ray launcher
submits a 4-rank tiny job with `gpus_per_node: 2` through RAY_ADDRESS: the planner sees
two nodes of two ranks, so the workers must put ranks 0-1 on one Ray node and 2-3 on the
other. The reference for the node ids is Ray's own node table (read by a separate
process); the ranks' placement comes from the driver's log lines in the job's logs.
The commands are the ones docs/operations.md gives.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from controller.client import RingmasterClient
from controller.server import Controller, ControllerConfig
from controller.testing import free_port, serving
from scheduler.synth import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

RAY = str(Path(sys.executable).with_name("ray"))
NODES_SCRIPT = """
import json, ray
ray.init(address={address!r}, log_to_driver=False)
print(json.dumps([{{"id": n["NodeID"], "resources": n["Resources"]}}
                  for n in ray.nodes() if n["Alive"]]))
"""


def ray_env(tmp: Path) -> dict[str, str]:
    """What every process of this cluster needs: `ray start` turns on Ray's token
    authentication, and this cluster's token is its own (not ~/.ray/auth_token)."""
    return {"RAY_TMPDIR": (tmp / "ray_dir").read_text(), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": (tmp / "token").read_text().strip()}


def ray_node(tmp: Path, name: str, *, head_port: int | None = None,
             address: str | None = None) -> subprocess.Popen:
    """`ray start --block` of one node in a session of its own, every port picked free."""
    ports = ["--node-manager-port", str(free_port()), "--object-manager-port",
             str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port",
             str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"]
    role = ["--head", "--port", str(head_port), "--include-dashboard", "false",
            "--ray-client-server-port", str(free_port())] if head_port else \
        ["--address", address]
    cmd = [RAY, "start", "--block", *role, *ports, "--num-cpus", "2", "--resources",
           json.dumps({name: 1}), "--object-store-memory", "100000000",
           "--disable-usage-stats"]
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ray_env(tmp)})


def alive_nodes(tmp: Path, address: str) -> list[dict]:
    """Ray's node table, read by a separate process ([] while the head is not up yet)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        out = subprocess.run([sys.executable, "-c", NODES_SCRIPT.format(address=address)],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, **ray_env(tmp)})
    except (OSError, subprocess.TimeoutExpired):
        return []
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def stop_node(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray2")
    # Ray's unix sockets live under RAY_TMPDIR and must stay under 108 bytes.
    ray_dir = tempfile.mkdtemp(prefix="rm2n-", dir="/tmp")
    (tmp / "ray_dir").write_text(ray_dir)
    (tmp / "token").write_text(secrets.token_hex(16))
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = [ray_node(tmp, "node_head", head_port=port)]
    try:
        deadline = time.monotonic() + 600
        nodes: list[dict] = []
        while time.monotonic() < deadline and len(nodes) < 2:
            if len(procs) == 1 and alive_nodes(tmp, address):
                procs.append(ray_node(tmp, "node_second", address=address))
            nodes = alive_nodes(tmp, address) if len(procs) == 2 else []
            time.sleep(1)
        assert len(nodes) == 2, (tmp / "node_head.log").read_text()[-2000:]
        names = {next(k for k in n["resources"] if k.startswith("node_")): n["id"]
                 for n in nodes}
        yield address, ray_env(tmp), names
    finally:
        for p in reversed(procs):
            stop_node(p)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_ranks_follow_the_planned_topology_on_two_ray_nodes(two_nodes, tmp_path):
    address, env, node_ids = two_nodes
    synthesize(tmp_path / "data", distribution="uniform", num_samples=120, max_length=300,
               seed=4)
    state = tmp_path / "state"
    ctl = Controller(ControllerConfig(state_dir=state, launcher="ray", port=0, grpc_port=0,
                                      token="t", reconcile_interval_s=0.2,
                                      launcher_options={"ray_address": address,
                                                        "total_ranks": 4,  # the cluster's CPUs
                                                        "extra_env": {
                                                            **env,
                                                            "OTEL_TRACES_EXPORTER": "none"}}))
    try:
        with serving(ctl, free_port()) as url, RingmasterClient(url, token="t") as client:
            ctl.start()
            job = client.submit({
                "name": "two-nodes", "model": "tiny",
                "dataset": {"path": str(tmp_path / "data")},
                "resources": {"num_ranks": 4, "cluster": "cpu", "gpus_per_node": 2,
                              "capacity_tokens": 128},
                "training": {"steps": 3, "global_batch_tokens": 900, "seed": 7},
                "planner": {"time_limit_s": 0.2},
                "failure": {"max_restarts": 0, "heartbeat_timeout_s": 120}})
            done = client.wait(job.id, timeout_s=600, poll_s=1.0)
            lines = [ln.text for ln in client.logs(job.id, tail=1000).lines]
    finally:
        for rec in list(ctl.launcher._drivers.values()):
            ctl.launcher._kill(rec, grace_s=2)
        ctl.close()
    assert done.result == "Succeeded", (done.reason, done.message, lines[-30:])
    placed = {int(m.group(1)): m.group(2) for m in
              (re.search(r"rank (\d+) runs on ray node (\w+)", t) for t in lines) if m}
    assert sorted(placed) == [0, 1, 2, 3], lines[-30:]
    # Planner node k holds ranks 2k and 2k+1; each planner node is one Ray node.
    first, second = {placed[0], placed[1]}, {placed[2], placed[3]}
    assert len(first) == 1 and len(second) == 1 and first != second
    assert first | second == set(node_ids.values())
