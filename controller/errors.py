"""How the REST API turns every failure into a status, keyed on the error's class.

What a client can get wrong is a 4xx with one line naming the field and the value: request
validation errors are 422 with the dotted field path (bodies that do not parse too, see
controller.edge); the domain errors of scheduler.errors map by family: a spec, dataset,
plan or capacity error is a 422, a `ConflictError` a 409 (a reused submission id, a stop of
a finished job, a checkpoint directory another job holds), a `NotFoundError` a 404; a body
too large is a 413, too slow a 408; a wrong method is a 405 whose `Allow` lists every method
of that path; an unreachable or overloaded store is a 503.

Anything else is a controller bug, whatever its class (a bare ValueError, KeyError or
TypeError from inside the planner included; a Redis error reply to a command we sent): a
500 whose body carries an error id, the traceback in the log under that id, and a
`controller.internal_error` event on the request's span. It is never the client's fault,
so it is never a 4xx.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.errors import (
    CapacityError,
    ConflictError,
    DatasetError,
    NotFoundError,
    PlanError,
    SpecError,
)

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 408: "request_timeout", 409: "conflict",
          413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


def error_response(status: int, message: str, *, details: list[dict] | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None,
                   error_id: str | None = None) -> JSONResponse:
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message,
                      "details": details or []}}
    if error_id is not None:  # a 500 only: the id the controller log repeats
        body["error"]["error_id"] = error_id
    return JSONResponse(body, status_code=status, headers=headers)


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, parts = parts[0], parts[1:]
        return ".".join(parts) if where == "body" and parts else ".".join([where, *parts])
    return ".".join(parts)


def _describe(err: dict) -> dict:
    field = _field_of(tuple(err.get("loc", ())))
    msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "")
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        field, msg = "body", f"not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    value = err.get("input")
    if err.get("type") != "missing" and not isinstance(value, dict | list) and value is not None:
        shown = repr(value)
        msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
    return {"field": field or None, "message": msg}


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [_describe(e) for e in exc.errors()]
    head = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"]
                     for d in details[:5])
    more = f" (+{len(details) - 5} more)" if len(details) > 5 else ""
    return error_response(422, f"invalid request: {head}{more}", details=details)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (starlette's own 405 names
    only the first route that matched the path)."""
    scope = {k: v for k, v in request.scope.items() if k not in ("route", "endpoint")}
    return [m for m in _METHODS
            if any(route.matches({**scope, "method": m})[0] is Match.FULL
                   for route in request.app.router.routes)]


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        allow = allowed_methods(request)
        headers["Allow"] = ", ".join(allow)
        return error_response(405, f"{request.method} is not allowed on {request.url.path}; "
                                   f"allowed: {', '.join(allow)}", headers=headers)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return error_response(422, "invalid request: body: could not be parsed", details=[
            {"field": "body", "message": "could not be parsed"}])
    return error_response(exc.status_code, str(exc.detail), headers=headers or None)


async def on_user_error(request: Request, exc: Exception, *, status: int = 422,
                        ) -> JSONResponse:
    message = " ".join(str(exc).split())[:2000]
    field = getattr(exc, "field", None)
    details = [{"field": field, "message": message.removeprefix(f"{field}: ")}] if field \
        else None
    return error_response(status, message, details=details)


# A server that is loading, out of memory, read-only or failing over: unavailable. Any
# other error reply means we sent a command it refuses: a bug of ours.
_STORE_BUSY = ("OOM", "READONLY", "MISCONF", "LOADING", "MASTERDOWN", "NOREPLICAS",
               "TRYAGAIN", "CLUSTERDOWN", "BUSY")


def store_unavailable(exc: redis.RedisError) -> bool:
    if isinstance(exc, redis.ResponseError):
        return str(exc).split(" ", 1)[0] in _STORE_BUSY
    return True


async def on_store_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    if not store_unavailable(exc):
        return await on_bug(request, exc)
    log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "the job store (Redis) is unavailable; retry shortly",
                          headers={"Retry-After": "1"})


async def on_bug(request: Request, exc: Exception) -> JSONResponse:
    """A 500 for a controller bug: a fresh error id in the body, the traceback in the log
    and a span event under that id (the span is the request's, see instrument_fastapi)."""
    error_id = secrets.token_hex(6)
    log.error("internal error %s on %s %s: %s: %s", error_id, request.method,
              request.url.path, type(exc).__name__, exc, exc_info=exc)
    span = trace.get_current_span()
    span.set_attribute("error.id", error_id)
    span.add_event("controller.internal_error", {
        "error.id": error_id, "exception.type": type(exc).__qualname__,
        "exception.message": str(exc)[:1000]})
    return error_response(500, f"internal error {error_id}; the controller log has details",
                          code="internal", error_id=error_id)


# The client's fault, by domain family (scheduler.errors), and nothing else: a ValueError
# that is none of these is a bug (on_bug). Starlette looks a handler up along the
# exception's MRO, so a class in two families takes its first: CheckpointDirInUse is a
# ConflictError before it is a SpecError.
USER_ERRORS = {NotFoundError: 404, ConflictError: 409, SpecError: 422, DatasetError: 422,
               PlanError: 422, CapacityError: 422}


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler as taking Exception, though it calls each with its class.
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    for family, status in USER_ERRORS.items():
        app.add_exception_handler(family, functools.partial(on_user_error, status=status))
    app.add_exception_handler(redis.RedisError, on_store_down)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_bug)


class BodyLimits:
    """ASGI middleware: 413 for bodies over `max_bytes` (declared or actually streamed),
    408 (and the connection closed) for a body not complete `timeout_s` after the request
    began: a client trickling a body cannot hold a connection and a worker thread."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        seen, complete = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: e.g. waiting for a disconnect, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise StarletteHTTPException(408, f"request body not received within "
                                                  f"{self.timeout_s:g} s",
                                             headers={"Connection": "close"}) from None
            complete = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body that grew past the limit
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body over {self.max_bytes} bytes")
        await response(scope, receive, send)
