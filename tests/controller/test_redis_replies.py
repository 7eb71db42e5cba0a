"""controller.redis_replies against a real (embedded) Redis: replies of a decoding client
come back as the str shapes the store reads; a client that does not decode is refused
with a TypeError that says why, instead of b'...' values reaching the store."""

from __future__ import annotations

import pytest
import redis

from controller import redis_replies as replies
from controller.redis_server import open_redis


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    h = open_redis(state_dir=tmp_path_factory.mktemp("redis"), url="")
    yield h
    h.close()


def test_decoded_replies_keep_their_shapes(handle):
    r = handle.client
    r.delete("z", "h", "s")
    r.zadd("z", {"a": 1, "b": 2.5})
    r.hset("h", mapping={"k": "v", "n": 3})
    stream_id = r.xadd("s", {"at": 1.5, "text": "hi"})
    assert replies.scored(r.zrange("z", 0, -1, withscores=True)) == [("a", 1.0), ("b", 2.5)]
    assert replies.texts(r.zrange("z", 0, -1)) == ["a", "b"]
    assert replies.text_hash(r.hgetall("h")) == {"k": "v", "n": "3"}
    assert replies.optional_text(r.hget("h", "missing")) is None
    assert replies.stream_entries(r.xrange("s")) == [(stream_id, {"at": "1.5", "text": "hi"})]
    assert replies.read_entries(r.xread({"s": "0"}, count=10)) == \
        [(stream_id, {"at": "1.5", "text": "hi"})]
    assert replies.read_entries(r.xread({"s": stream_id}, count=10)) == []


def test_a_client_that_does_not_decode_is_refused(handle):
    raw = redis.Redis(unix_socket_path=handle.socket_path, decode_responses=False)
    try:
        raw.set("plain", "x")
        raw.zadd("raw-z", {"a": 1})
        with pytest.raises(TypeError, match="decode_responses=True"):
            replies.text(raw.get("plain"))
        with pytest.raises(TypeError, match="member, score"):
            replies.scored(raw.zrange("raw-z", 0, -1))  # members without scores
    finally:
        raw.close()
