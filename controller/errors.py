"""How the REST API turns every failure into a 4xx (or 503) with one line naming the field.

Nothing a client sends may produce a 500: request validation errors become 422 with the
dotted field path, domain errors map to their status (404 unknown job, 409 conflicts,
413 body too large), an unreachable store is 503. Only a controller bug can reach the
final 500 handler, which logs the traceback and returns an opaque error id.
"""

from __future__ import annotations

import logging
import secrets

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.states import StaleState
from controller.store import JobNotFound, SubmissionConflict
from scheduler.errors import RingmasterError

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


def error_response(status: int, message: str, *, details: list[dict] | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None,
                   ) -> JSONResponse:
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message,
                      "details": details or []}}
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


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers",
                                                                              None))


async def on_not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    return error_response(404, str(exc))


async def on_conflict(request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, str(exc))


async def on_user_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, str(exc).replace("\n", " "))


async def on_store_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    log.error("job store unavailable: %s", exc)
    return error_response(503, "the job store (Redis) is unavailable; retry shortly",
                          headers={"Retry-After": "1"})


async def on_bug(request: Request, exc: Exception) -> JSONResponse:
    error_id = secrets.token_hex(6)
    log.exception("internal error %s on %s %s", error_id, request.method, request.url.path)
    return error_response(500, f"internal error {error_id}; the controller log has details",
                          code="internal")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(JobNotFound, on_not_found)
    app.add_exception_handler(SubmissionConflict, on_conflict)
    app.add_exception_handler(StaleState, on_conflict)
    app.add_exception_handler(RingmasterError, on_user_error)
    app.add_exception_handler(ValueError, on_user_error)
    app.add_exception_handler(redis.RedisError, on_store_down)
    app.add_exception_handler(Exception, on_bug)


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `max_bytes` (declared or actually streamed)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body that grew past the limit
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body over {self.max_bytes} bytes")
        await response(scope, receive, send)
