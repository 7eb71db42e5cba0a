"""Replies of the controller's Redis clients, as the types they are.

Every client the controller makes decodes replies (`decode_responses=True`,
controller.redis_server), so Redis answers with `str`; redis-py annotates each reply of
any client as `bytes | str` (and a sorted-set range as members or (member, score) pairs
alike). These helpers narrow a reply to what the command returns on such a client and
raise `TypeError` on anything else (a client made without decode_responses), instead of
letting `b'...'` strings flow into job ids and JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis.typing import StreamRangeResponse, XReadResponse, ZSetRangeResponse

__all__ = ["optional_text", "read_entries", "scored", "stream_entries", "text", "text_hash",
           "texts"]

LogEntry = tuple[str, dict[str, str]]  # a stream entry: (id, fields)


def text(reply: object) -> str:
    """One string reply (a value, a member, a stream id)."""
    if not isinstance(reply, str):
        raise TypeError(f"expected a decoded Redis reply (str), got {type(reply).__name__}: "
                        f"the client must be made with decode_responses=True")
    return reply


def optional_text(reply: object) -> str | None:
    """A string reply, or None for a missing key or field."""
    return None if reply is None else text(reply)


def texts(replies: Iterable[object]) -> list[str]:
    """A list or set of string replies (members, list items), in their order."""
    return [text(r) for r in replies]


def text_hash(reply: Mapping[Any, object]) -> dict[str, str]:
    """An HGETALL reply (or a stream entry's fields)."""
    return {text(k): text(v) for k, v in reply.items()}


def scored(reply: ZSetRangeResponse) -> list[tuple[str, float]]:
    """A sorted-set range read `withscores=True`: (member, score) pairs."""
    out = []
    for row in reply:
        if isinstance(row, str | bytes) or len(row) != 2:
            raise TypeError(f"expected (member, score) pairs, got {row!r}")
        out.append((text(row[0]), float(row[1])))
    return out


def stream_entries(reply: StreamRangeResponse | None) -> list[LogEntry]:
    """An XRANGE/XREVRANGE reply: (id, fields) entries."""
    out = []
    for entry_id, fields in reply or ():
        out.append((text(entry_id), text_hash(fields or {})))
    return out


def read_entries(reply: XReadResponse | None) -> list[LogEntry]:
    """The entries of the one stream an XREAD asked for ([] when its block timed out)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        raise TypeError("expected a RESP2 XREAD reply (a list of [stream, entries])")
    return stream_entries(reply[0][1])
