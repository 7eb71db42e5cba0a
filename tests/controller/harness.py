"""A real controller for tests: embedded Redis, FakeLauncher, uvicorn on a loopback port
(configured exactly as `ringmaster serve` configures it).

`running_controller(state_dir)` yields a `Harness` with the base URL, the token, the
Controller (store, machine, launcher) and an in-memory span exporter. The reconciler is not
started: tests step the state machine themselves with `harness.controller.machine.tick()`.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.launchers import FakeLauncher
from controller.server import Controller, ControllerConfig
from controller.telemetry import make_tracer_provider


def _demo_dataset() -> str:
    """A small real dataset for DEMO_SPEC (submit validates it); removed at exit."""
    from scheduler.synth import synthesize

    out = Path(tempfile.mkdtemp(prefix="ringmaster-demo-data-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    synthesize(out, distribution="uniform", num_samples=64, max_length=400, seed=3)
    return str(out)


DEMO_DATA = _demo_dataset()
DEMO_SPEC = {
    "name": "demo",
    "model": "tiny",
    "dataset": {"path": DEMO_DATA},
    "resources": {"num_ranks": 4, "cluster": "cpu"},
    "training": {"steps": 10, "global_batch_tokens": 4096},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Harness:
    url: str
    token: str
    controller: Controller
    launcher: FakeLauncher
    spans: InMemorySpanExporter

    def client(self, token: str | None = "default") -> httpx.Client:
        tok = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextlib.contextmanager
def running_controller(state_dir: Path, *, total_ranks: int = 64, token: str = "test-token",
                       **config) -> Iterator[Harness]:
    """`config`: further ControllerConfig fields (limits, data roots, TLS, ...)."""
    spans = InMemorySpanExporter()
    launcher = FakeLauncher(total_ranks=total_ranks)
    provider = make_tracer_provider(exporters=[spans], synchronous=True)
    port = free_port()
    ctl = Controller(ControllerConfig(state_dir=state_dir, launcher="fake", token=token,
                                      redis_url="", port=port, **config),
                     launcher=launcher, tracer_provider=provider)
    server = uvicorn.Server(ctl.uvicorn_config(log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Harness(url=f"http://127.0.0.1:{port}", token=token, controller=ctl,
                      launcher=launcher, spans=spans)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        ctl.close()
