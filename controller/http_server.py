"""How uvicorn serves the REST API: bounded connections, header and body deadlines, TLS.

uvicorn on its own lets a client hold a connection forever by sending half a request: it
has an idle keep-alive timeout but no deadline for a request's headers, and none for its
body. Here:

- `GuardedH11Protocol` closes a connection whose request headers are not complete
  `header_timeout_s` after the connection opened (or after the previous response);
- controller.errors.BodyLimits answers 408 (and closes) for a body not complete
  `body_timeout_s` after its headers;
- `limit_concurrency` caps open connections (`max_connections`): past it, new requests
  get 503 at once instead of piling up;
- with `tls_cert`/`tls_key` the API speaks HTTPS (certificate files as cert-manager
  writes them: `tls.crt`, `tls.key`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scheduler.errors import SpecError

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11's incomplete-event limit


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Connection limits of the REST API."""

    max_connections: int = 1000  # open connections; more get 503
    header_timeout_s: float = 10.0  # request line and headers must arrive within this
    keep_alive_s: float = 5.0  # idle time before a kept-alive connection is closed

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.header_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise SpecError(f"{self}: every limit must be positive")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                      self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s",
                             self.header_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm_header_timer()  # the start of a request on a kept-alive connection
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class with this header deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s})


def uvicorn_config(app, *, host: str, port: int, limits: HttpLimits,
                   tls_cert: Path | None = None, tls_key: Path | None = None,
                   log_level: str = "info") -> uvicorn.Config:
    """The uvicorn.Config every REST server of the controller runs with."""
    if (tls_cert is None) != (tls_key is None):
        raise SpecError("--tls-cert and --tls-key: give both or neither")
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        http=guarded_protocol(limits.header_timeout_s),
        limit_concurrency=limits.max_connections,
        # uvicorn annotates int seconds; it hands the figure to loop.call_later (a float)
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None)
