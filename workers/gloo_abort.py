"""Closing a gloo process group's connections, so that peers blocked on this rank fail now.

gloo has no abort that closes its TCP connections: ProcessGroupGloo.abort and shutdown
leave them open, and destroying the group does not close them while anything (a pending
work object, a traceback) still holds it. A rank whose step broke on a lost peer would
then leave its other peers blocked on it until the process-group timeout. So the rank
records, when the group forms, exactly which sockets are the group's pair connections,
and shuts them down (SHUT_RDWR, not close: gloo still owns the descriptors) when it
abandons the group; the peers' pending receives fail with "connection closed" at once.

Which sockets: gloo's TCP transport opens one listening socket per rank and one
connection per pair, either accepted on that listener (its local address is the
listener's) or connected to a peer's listener (its remote address is the peer's). The
members exchange their listeners' addresses over the new group, and only sockets that
were opened while the group formed *and* match one of those addresses are recorded: the
other sockets the process opens meanwhile (Ray's, gRPC's) are never touched. Before a
descriptor is shut down its addresses are checked again, in case gloo closed it and the
number was reused. Linux only (/proc/self/fd); elsewhere nothing is recorded and peers
wait for the process-group timeout, as they would without this module.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

Address = tuple  # (host, port) of an AF_INET socket, (host, port, flow, scope) of AF_INET6
Endpoints = tuple[Address, Address | None]  # (local, remote); remote None: a listener

__all__ = ["Endpoints", "group_connections", "open_sockets", "shut_down"]


def _endpoints(fd: int) -> Endpoints | None:
    """(local, remote) of an IP stream socket, remote None if it listens; else None."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) \
                    or sock.type != socket.SOCK_STREAM:
                return None
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return sock.getsockname(), None
            return sock.getsockname(), sock.getpeername()
    except OSError:  # closed meanwhile, not connected, not a socket
        return None


def open_sockets() -> dict[int, Endpoints]:
    """This process's IP stream sockets by descriptor (empty where /proc is missing)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
        except OSError:
            continue
        ends = _endpoints(int(name))
        if ends is not None:
            out[int(name)] = ends
    return out


def group_connections(before: dict[int, Endpoints],
                      gather: Callable[[list[Address]], list[list[Address]]]
                      ) -> dict[int, Endpoints]:
    """The pair connections of the group that formed since `before` was taken.

    `gather` exchanges every member's listener addresses (an all_gather_object over the
    new group: collective, every member calls this)."""
    new = {fd: e for fd, e in open_sockets().items() if before.get(fd) != e}
    mine = [local for local, remote in new.values() if remote is None]
    listeners = {tuple(a) for member in gather(mine) for a in member}
    return {fd: (local, remote) for fd, (local, remote) in new.items()
            if remote is not None and (local in listeners or remote in listeners)}


def shut_down(connections: dict[int, Endpoints]) -> int:
    """Shut down the recorded connections that are still what they were; how many."""
    done = 0
    for fd, ends in connections.items():
        if _endpoints(fd) != ends:
            continue
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            done += 1
        except OSError:
            continue
    return done
