"""What the REST API accepts at its edge, before any handler runs.

- JSON bodies are parsed here (`SafeJsonRoute`), not by FastAPI's bare `json.loads`: a
  body that is not UTF-8, not JSON, nested deeper than `MAX_JSON_DEPTH`, holding an
  integer over Python's 4,300-digit limit or a NaN/Infinity literal is a 422 that says
  which, where FastAPI would answer a 400 "There was an error parsing the body".
- Query integers, numbers and booleans are strict (`QueryInt`, `QueryFloat`,
  `QueryBool`): ASCII decimal digits only (no full-width or Arabic-Indic digits, no '+',
  '_' or spaces), booleans exactly `true`/`false`.
- Job ids in paths never contain ':', so `GET /v1/jobs/{id}:stop` is the stop route's
  405, not a malformed id (`JOB_ID_CONVERTOR`).
- Paths in a spec may be confined to data roots (`confine_paths`): outside them is a 422
  that reads the same whether or not the file exists.

Nothing here touches Redis or the filesystem beyond `os.path.realpath`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request

from controller.spec import JobCreate
from scheduler.errors import SpecError

MAX_JSON_DEPTH = 64  # a job spec nests 4 levels; nothing legitimate comes near this
_INT = re.compile(r"^-?[0-9]{1,19}$")
_FLOAT = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9})?$")


class FieldError(SpecError):
    """A spec value the controller refuses; `field` is its dotted path (for `details`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# --- strict query parameters --------------------------------------------------------------
def _ascii_int(value: object) -> object:
    if isinstance(value, str) and not _INT.match(value):
        raise SpecError("must be a decimal integer written with ASCII digits 0-9")
    return value


def _ascii_float(value: object) -> object:
    if isinstance(value, str) and not _FLOAT.match(value):
        raise SpecError("must be a plain decimal number such as 10 or 2.5")
    return value


def _strict_bool(value: object) -> object:
    if isinstance(value, str):
        if value not in ("true", "false"):
            raise SpecError("must be true or false")
        return value == "true"
    return value


QueryInt = Annotated[int, BeforeValidator(_ascii_int)]
QueryFloat = Annotated[float, BeforeValidator(_ascii_float)]
QueryBool = Annotated[bool, BeforeValidator(_strict_bool)]


# --- job ids in paths ---------------------------------------------------------------------
class _JobIdConvertor(Convertor):
    """Any path segment without ':' (the id's pattern is checked by the route, a 422)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


JOB_ID_CONVERTOR = "rm_job_id"
register_url_convertor(JOB_ID_CONVERTOR, _JobIdConvertor())


# --- JSON bodies --------------------------------------------------------------------------
def _body_error(message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": message,
                                    "input": {}, "ctx": {"error": message}}])


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: object) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_body(body: bytes) -> object:
    """The decoded body, or a RequestValidationError that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _body_error(f"not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _body_error(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _body_error(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # an integer over the digit limit, NaN/Infinity
        raise _body_error(str(exc).split(";")[0][:120]) from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise _body_error(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


class SafeJsonRoute(APIRoute):
    """An APIRoute whose JSON body is decoded by `parse_json_body` (FastAPI then validates
    the decoded value as usual)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            if self.body_field is not None and _is_json(request.headers.get("content-type")):
                body = await request.body()
                if body:
                    request._json = parse_json_body(body)  # Request.json() returns this
            return await handler(request)

        return route


# --- data roots ---------------------------------------------------------------------------
def spec_paths(spec: JobCreate) -> Iterator[tuple[str, str]]:
    """(field, path) of every path in a spec the controller or its workers open."""
    from controller.spec import ModelSource, _is_path

    yield "dataset.path", spec.dataset.path
    if isinstance(spec.model, ModelSource) and _is_path(spec.model.source):
        yield "model.source", spec.model.source
    elif isinstance(spec.model, str) and _is_path(spec.model):  # a directory or config.json
        yield "model", spec.model
    for name in ("checkpoint_dir", "resume_from", "tensorboard_dir"):
        value = getattr(spec.training, name)
        if value:
            yield f"training.{name}", value


def resolve_roots(roots: tuple[str | Path, ...]) -> tuple[Path, ...]:
    """Data roots as canonical absolute paths (each must be an existing directory)."""
    out = []
    for root in roots:
        path = Path(os.path.realpath(os.path.expanduser(str(root))))
        if not path.is_dir():
            raise SpecError(f"--data-root {root}: not a directory")
        out.append(path)
    return tuple(out)


def confine_paths(spec: JobCreate, roots: tuple[Path, ...]) -> None:
    """FieldError unless every path of `spec` lies inside one of `roots` (no roots: any).

    Paths are resolved (symlinks, '..') the way the filesystem will follow them; the
    answer depends only on where the path points, never on whether anything is there.
    """
    if not roots:
        return
    for field, value in spec_paths(spec):
        resolved = Path(os.path.realpath(os.path.abspath(value)))
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise FieldError(field, f"{value!r} is outside the controller's data roots "
                                    f"({', '.join(str(r) for r in roots)})")
