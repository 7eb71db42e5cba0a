"""Start a real controller for tests and bench/ scripts, on loopback ports (torch-free).

- `free_port()`: a loopback TCP port the OS reports free now (bind to it soon: another
  process may take it in between, so use it for servers that cannot be given port 0).
- `start_controller(state_dir, port)`: `ringmaster serve` as a subprocess, as a user starts
  it; returns once /readyz answers 200.
- `serving(controller, port)`: an in-process `Controller`'s REST server on a thread,
  configured as `ringmaster serve` configures it; the caller owns the controller (starts
  its reconciler or not, closes it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from controller.server import Controller

__all__ = ["free_port", "serving", "start_controller"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that is free at the time of the call."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_controller(state_dir: Path, port: int, *, launcher: str = "fake",
                     extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                     timeout_s: float = 60) -> subprocess.Popen:
    """`ringmaster serve --launcher <launcher>` on `port` with its state (and embedded
    Redis) in `state_dir`; waits until /readyz answers 200 (RuntimeError with the end of its
    stderr if it exits or is not ready within `timeout_s`). The caller stops the process.
    `env` adds to this process's environment; traces are off and REDIS_URL is dropped
    unless `env` sets them."""
    cmd = [sys.executable, "-c", "from controller.cli import main; main()", "serve",
           "--port", str(port), "--state-dir", str(state_dir), "--launcher", launcher,
           "--log-level", "warning", *extra_args]
    full_env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    full_env |= {"OTEL_TRACES_EXPORTER": "none", **(env or {})}
    # A file, not a pipe: a pipe nobody reads would block the server once it fills.
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_ready(proc, f"http://{LOOPBACK}:{port}/readyz", stderr, timeout_s)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    finally:
        stderr.close()
    return proc


def _wait_ready(proc: subprocess.Popen, url: str, stderr, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"controller exited with status {proc.returncode}: {tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"controller did not become ready in {timeout_s:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(controller: Controller, port: int | None = None, *, log_level: str = "warning",
            timeout_s: float = 60) -> Iterator[str]:
    """Run `controller`'s REST server on a daemon thread, on `port` (default: the port of
    its configuration); yields the base URL once uvicorn has started, and stops the server
    (not the controller) on exit."""
    import uvicorn

    server = uvicorn.Server(controller.uvicorn_config(log_level=log_level, port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {timeout_s:.0f} s")
        time.sleep(0.02)
    scheme = "https" if controller.config.tls else "http"
    try:
        yield f"{scheme}://{LOOPBACK}:{controller.config.port if port is None else port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
