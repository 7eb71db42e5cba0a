"""The controller process: Redis, job store, launcher, state machine and REST API together.

`Controller(config)` opens the store (embedded Redis in the state directory unless
`REDIS_URL`, supervised: restarted if it dies), builds the launcher that config names, the
gRPC service for workers (every call authenticated with its attempt's secret,
controller.worker_auth) and the app; `serve(config)` runs it under uvicorn
(controller.http_server: connection cap, header and body deadlines, optional TLS) until
SIGINT/SIGTERM and then stops what it started (the embedded Redis is shut down with a
final save; jobs' workers are left running: they outlive the controller).

State directory layout (default ~/.ringmaster, or $RINGMASTER_STATE_DIR), mode 0700, every
file in it 0600 (job specs, logs and the token are not for other local users):
    token             the API bearer token, created on first start
    controller.json   where the running controller listens (the CLI reads it)
    redis.db, appendonly.aof   the embedded Redis's data
    ray/              the Ray launcher's driver records and logs
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import TracerProvider

from controller.api import ApiSettings, create_app
from controller.edge import resolve_roots
from controller.http_server import HttpLimits, uvicorn_config
from controller.launchers import KUBERAY_NAMES, Launcher, StandbyLauncher, make_launcher
from controller.launchers.base import reject_kubernetes_section
from controller.leader import LeaderElectionConfig, LeaderElector
from controller.machine import JobStateMachine, Reconciler, Timeouts
from controller.redis_server import open_redis, private_dir
from controller.store import JobNotFound, JobStore
from controller.telemetry import instrument_redis, make_tracer_provider
from controller.worker_auth import WorkerAuth
from scheduler.errors import SpecError

if TYPE_CHECKING:
    import grpc

    from controller.worker_service import WorkerService

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_GRPC_PORT = 50051


def default_state_dir() -> Path:
    return Path(os.environ.get("RINGMASTER_STATE_DIR") or Path.home() / ".ringmaster")


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files of the controller's certificate (as cert-manager writes them)."""

    cert: Path  # tls.crt: the certificate (chain) for REST and gRPC
    key: Path  # tls.key: its private key
    ca: Path | None = None  # ca.crt: what workers and clients trust; default `cert` itself

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SpecError(f"--tls-{name} {path}: no such file")

    @property
    def trust(self) -> Path:
        return self.ca or self.cert


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """How one controller process runs."""

    state_dir: Path = field(default_factory=default_state_dir)  # token, Redis data
    host: str = "127.0.0.1"  # REST bind address
    port: int = DEFAULT_PORT  # REST port (0: any free port)
    grpc_port: int = DEFAULT_GRPC_PORT  # port workers call back on (execution plane)
    redis_url: str | None = None  # external Redis; default $REDIS_URL, else embedded
    launcher: str = "ray"  # ray | kuberay | external (ranks started by others) | fake
    launcher_options: dict = field(default_factory=dict)  # extra constructor keywords
    token: str | None = None  # default $RINGMASTER_TOKEN, else state_dir/token
    reconcile_interval_s: float = 0.5  # how often the state machine steps
    max_body_bytes: int = 1 << 20  # REST request size limit
    body_timeout_s: float = 30.0  # a request body must arrive within this
    http: HttpLimits = field(default_factory=HttpLimits)  # REST connection limits
    timeouts: Timeouts = field(default_factory=Timeouts)  # Scheduling/Stopping deadlines
    data_roots: tuple[Path, ...] = ()  # dataset/model/checkpoint paths confined here
    tls: TlsFiles | None = None  # HTTPS and gRPC over TLS
    # Several replicas: only the Lease holder runs the state machine and the gRPC service
    # (controller.leader); default from the RINGMASTER_LEADER_* variables, None: alone.
    leader_election: LeaderElectionConfig | None = field(
        default_factory=LeaderElectionConfig.from_env)


def load_or_create_token(state_dir: Path) -> str:
    """The token in state_dir/token, created (random, mode 0600) when absent."""
    path = state_dir / "token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    private_dir(state_dir)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Controller:
    """Everything one controller process owns; `close()` releases it in reverse order.

    Alone (no leader election) it runs the state machine, the launcher and the gRPC service
    from `start()`. With leader election it starts as a standby (REST only, a
    StandbyLauncher) and builds launcher, gRPC service and reconciler when it takes the
    Lease; losing it tears them down again (the new leader adopts the jobs' workers).
    """

    def __init__(self, config: ControllerConfig, *, launcher: Launcher | None = None,
                 launcher_factory: Callable[[], Launcher] | None = None,
                 tracer_provider: TracerProvider | None = None, elector_options=None):
        self.config = config
        private_dir(config.state_dir)
        self.token = config.token or os.environ.get("RINGMASTER_TOKEN") or \
            load_or_create_token(config.state_dir)
        self.worker_auth = WorkerAuth.from_token(self.token)  # the same on every replica
        self.tracer_provider = tracer_provider or make_tracer_provider()
        settings = ApiSettings(token=self.token, max_body_bytes=config.max_body_bytes,
                               body_timeout_s=config.body_timeout_s,
                               data_roots=resolve_roots(config.data_roots))
        self.redis = open_redis(state_dir=config.state_dir, url=config.redis_url,
                                max_block_s=settings.max_log_wait_s)
        self._launcher_factory = launcher_factory or (lambda: launcher or self._make_launcher())
        self.grpc_server: grpc.Server | None = None
        self.worker_service: WorkerService | None = None
        self._planner_pool: Executor | None = None
        self.leader: LeaderElector | None = None
        try:
            instrument_redis(self.redis.client, self.tracer_provider)
            self.store = JobStore(self.redis.client,
                                  tracer=self.tracer_provider.get_tracer("controller.store"))
            if config.leader_election is None:
                self.launcher = self._launcher_factory()
            else:
                self._standby_spec_check = None if launcher or launcher_factory else \
                    self._spec_check()
                self.launcher = StandbyLauncher(check=self._standby_spec_check)
                self.leader = LeaderElector(config.leader_election, on_change=self._on_role,
                                            **(elector_options or {}))
        except BaseException:
            self.redis.close()
            raise
        self.redis.supervise()
        self.machine = JobStateMachine(store=self.store, launcher=self.launcher,
                                       timeouts=config.timeouts,
                                       tracer=self.tracer_provider.get_tracer(
                                           "controller.machine"))
        if self.leader is None and hasattr(self.launcher, "report"):
            self._start_worker_service()  # launchers whose workers call back over gRPC
        self.reconciler = Reconciler(self.machine, interval_s=config.reconcile_interval_s)
        self.app = create_app(store=self.store, machine=self.machine, settings=settings,
                              redis_handle=self.redis, tracer_provider=self.tracer_provider)

    def _make_launcher(self) -> Launcher:
        c = self.config
        options = dict(c.launcher_options)
        if c.launcher != "fake":
            options.setdefault("controller_address", f"{c.host}:{c.grpc_port}")
            options.setdefault("worker_secret", self.worker_auth.secret_for)
            if c.tls is not None:
                options.setdefault("controller_ca", str(c.tls.trust))
        if c.launcher in ("ray", "external"):
            options.setdefault("state_dir", c.state_dir)
        if c.launcher == "ray":
            options.setdefault("on_logs", self._worker_logs)
        return make_launcher(c.launcher, **options)

    def _spec_check(self) -> Callable | None:
        """What a standby checks submissions with: the rules of the launcher it would run."""
        c = self.config
        if c.launcher in KUBERAY_NAMES:
            from controller.launchers.kubernetes import KubernetesLauncherConfig, check_job_spec

            cfg = c.launcher_options.get("config") or KubernetesLauncherConfig.from_env(
                c.launcher_options.get("controller_address", f"{c.host}:{c.grpc_port}"))
            return partial(check_job_spec, cfg)
        if c.launcher == "fake":
            return None
        return partial(reject_kubernetes_section, launcher=c.launcher)

    # leader election ----------------------------------------------------------------------
    def _on_role(self, leading: bool) -> None:
        """Called in order on the elector's role thread."""
        if leading:
            self._lead()
        else:
            self._stand_by()

    def _lead(self) -> None:
        self.launcher = self._launcher_factory()  # a Kubernetes launcher adopts its clusters
        self.machine.launcher = self.launcher
        assert self.leader is not None, "only the elector makes a replica lead"
        if hasattr(self.launcher, "report"):
            self._start_worker_service()
            self.leader.publish_endpoint(self.grpc_port)
        self.reconciler = Reconciler(self.machine,
                                     interval_s=self.config.reconcile_interval_s).start()
        log.info("this replica leads: state machine and gRPC service running")

    def _stand_by(self) -> None:
        self.reconciler.close()
        self.machine.launcher = StandbyLauncher(check=self._standby_spec_check)
        self._stop_worker_service()
        old, self.launcher = self.launcher, self.machine.launcher
        old.close()
        log.info("this replica stands by: REST only until it leads again")

    def _start_worker_service(self) -> None:
        import grpc

        from controller.planning import make_planner_pool
        from controller.worker_service import WorkerService, serve_grpc

        pool = make_planner_pool()
        service = WorkerService(store=self.store, launcher=self.launcher, planner_pool=pool,
                                auth=self.worker_auth, tracer_provider=self.tracer_provider)
        self._planner_pool, self.worker_service = pool, service
        tls = self.config.tls
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())]) if tls is not None else None
        self.grpc_server, self.grpc_port = serve_grpc(
            service, host=self.config.host, port=self.config.grpc_port,
            credentials=credentials)
        if hasattr(self.launcher, "controller_address"):  # grpc_port 0 picks a free port
            self.launcher.controller_address = f"{self.config.host}:{self.grpc_port}"

    def _stop_worker_service(self) -> None:
        if self.grpc_server is not None:
            assert self.worker_service is not None and self._planner_pool is not None, \
                "_start_worker_service sets all three"
            self.grpc_server.stop(grace=2).wait(5)
            self.worker_service.close()
            self._planner_pool.shutdown(wait=False, cancel_futures=True)
            self.grpc_server, self.worker_service, self._planner_pool = None, None, None

    def start(self) -> Controller:
        if self.leader is not None:
            self.leader.start()
        else:
            self.reconciler.start()
        return self

    def write_endpoint(self, url: str) -> None:
        """Tell local CLIs where this controller listens (state_dir/controller.json)."""
        info = {"url": url, "pid": os.getpid(), "redis": self.redis.description}
        if self.config.tls is not None:
            info["ca"] = str(self.config.tls.trust.resolve())
        path = self.config.state_dir / "controller.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info) + "\n")

    def _worker_logs(self, job_id: str, lines: list[str]) -> None:
        try:
            self.store.append_logs(job_id, lines)
        except JobNotFound:
            pass  # deleted while its workers were still printing

    def uvicorn_config(self, *, log_level: str = "info", port: int | None = None):
        """The uvicorn.Config of this controller's REST server (on `port`, default the
        configured one)."""
        c = self.config
        return uvicorn_config(self.app, host=c.host, port=c.port if port is None else port,
                              limits=c.http,
                              tls_cert=c.tls.cert if c.tls else None,
                              tls_key=c.tls.key if c.tls else None, log_level=log_level)

    def close(self) -> None:
        if self.leader is not None:
            self.leader.close()  # releases the Lease: a standby takes over at once
        self.reconciler.close()
        self._stop_worker_service()
        self.launcher.close()
        self.tracer_provider.shutdown()
        self.redis.close()
        (self.config.state_dir / "controller.json").unlink(missing_ok=True)


def serve(config: ControllerConfig, *, log_level: str = "info") -> None:
    """Run the controller in the foreground until interrupted."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s "
                                                        "%(name)s: %(message)s")
    controller = Controller(config, tracer_provider=make_tracer_provider(install=True))
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turn them into
    # exceptions so the `finally` below still stops the reconciler and the embedded Redis.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server = uvicorn.Server(controller.uvicorn_config(log_level=log_level))
        controller.start()
        _announce(controller, server)
        server.run()
    except (KeyboardInterrupt, SystemExit):
        log.info("controller stopping")
    finally:
        controller.close()


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _announce(controller: Controller, server) -> None:
    """Write controller.json once uvicorn has bound its socket (port 0 picks one)."""
    import threading
    import time

    scheme = "https" if controller.config.tls is not None else "http"

    def wait_bound() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            controller.write_endpoint(f"{scheme}://{host}:{port}")
            log.info("controller listening on %s://%s:%s (state in %s, store: %s)", scheme,
                     host, port, controller.config.state_dir, controller.redis.description)

    threading.Thread(target=wait_bound, daemon=True, name="announce").start()
