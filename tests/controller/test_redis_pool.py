"""The controller's Redis client serves more threads at once than it has connections:
a thread finding every connection busy waits for one instead of failing (redis-py's plain
pool refuses its 101st concurrent user with "Too many connections", which reached ranks as
UNAVAILABLE while a 256-rank world formed)."""
from __future__ import annotations

import threading

import pytest

from controller.redis_server import SYNC_CONNECTIONS, open_redis


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    h = open_redis(state_dir=tmp_path_factory.mktemp("redis"), url="")
    yield h
    h.close()


def test_more_concurrent_users_than_connections_all_get_answers(handle):
    users = SYNC_CONNECTIONS + 40  # more than the pool, and more than redis-py's default 100
    start = threading.Barrier(users)
    errors: list[BaseException] = []
    answers: list[object] = []

    def user() -> None:
        start.wait()
        try:
            # holds its connection for the whole wait, as a slow command would
            answers.append(handle.client.blpop(["nothing-arrives"], timeout=0.5))
        except BaseException as exc:  # noqa: BLE001 - the test reports every failure
            errors.append(exc)

    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, f"{len(errors)} of {users} failed, first: {errors[0]!r}"
    assert answers == [None] * users
    pool = handle.client.connection_pool
    assert pool.max_connections == SYNC_CONNECTIONS  # bounded: Redis sees at most this many
