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
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.launchers import FakeLauncher
from controller.server import Controller, ControllerConfig
from controller.telemetry import make_tracer_provider
from controller.testing import free_port, serving


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
    try:
        with serving(ctl) as url:
            yield Harness(url=url, token=token, controller=ctl, launcher=launcher, spans=spans)
    finally:
        ctl.close()
