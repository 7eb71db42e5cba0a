"""OpenTelemetry set-up shared by the controller and the workers (torch-free).

`make_tracer_provider()` builds a provider whose resource carries service.name
(`OTEL_SERVICE_NAME`, else the caller's default), service.version and anything in
`OTEL_RESOURCE_ATTRIBUTES`. The exporters follow `OTEL_TRACES_EXPORTER`: `otlp` (endpoint
and protocol from the standard `OTEL_EXPORTER_OTLP_*` variables), `console`, or `none`;
unset, it is `otlp` when an OTLP endpoint is configured and `none` otherwise, so a laptop
without a collector logs no export errors. `RINGMASTER_TRACE_FILE` additionally appends
every span as one JSON line to a file (the demo's trace, and how tests read the spans of
worker processes). Lives in scheduler/ because it is the torch-free layer both sides
import.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from scheduler.errors import SpecError

SERVICE_VERSION = "0.1.0"
EXPORTERS = ("otlp", "console", "none")
TRACE_FILE_ENV = "RINGMASTER_TRACE_FILE"


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON object per line (safe across processes:
    every line is a single O_APPEND write)."""

    def __init__(self, path: str | os.PathLike, *,
                 keep: Callable[[ReadableSpan], bool] | None = None):
        self.path = os.fspath(path)
        self.keep = keep  # None keeps every span
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        kept = [s for s in spans if self.keep is None or self.keep(s)]
        if not kept:
            return SpanExportResult.SUCCESS
        lines = "".join(json.dumps(json.loads(s.to_json())) + "\n" for s in kept)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def read_trace_file(path: str | os.PathLike) -> list[dict]:
    """The spans a JsonLinesSpanExporter wrote (as dicts), in write order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def exporters_from_env(env: dict[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER asks for (comma-separated list)."""
    env = dict(os.environ) if env is None else env
    default = "otlp" if any(k in env for k in ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) else "none"
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", default).split(",") if n.strip()]
    out: list[SpanExporter] = []
    for name in names:
        if name not in EXPORTERS:
            raise SpecError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; valid: "
                            f"{', '.join(EXPORTERS)}")
        if name == "console":
            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            out.append(_otlp_exporter(env))
    return out


def _otlp_exporter(env: dict[str, str]) -> SpanExporter:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                       env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    # Both exporters read endpoint, headers, TLS from the OTEL_* variables.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc_exporter
        return grpc_exporter.OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_exporter
        return http_exporter.OTLPSpanExporter()
    raise SpecError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; valid: "
                    "grpc, http/protobuf")


def make_tracer_provider(*, exporters: Sequence[SpanExporter] | None = None,
                         synchronous: bool = False, install: bool = False,
                         service_name: str | None = None,
                         default_service_name: str = "ringmaster") -> TracerProvider:
    """A provider with the service resource and the given (or OTEL_*-chosen) exporters.

    `synchronous` exports each span as it ends (tests); otherwise spans are batched.
    """
    resource = Resource.create({
        "service.name": service_name or os.environ.get("OTEL_SERVICE_NAME",
                                                       default_service_name),
        "service.version": SERVICE_VERSION,
        "service.namespace": "ringmaster",
    })
    provider = TracerProvider(resource=resource)
    for exporter in (exporters_from_env() if exporters is None else exporters):
        processor = SimpleSpanProcessor if synchronous else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    if exporters is None and os.environ.get(TRACE_FILE_ENV):  # flushed span by span: the
        provider.add_span_processor(SimpleSpanProcessor(  # processes may be killed
            JsonLinesSpanExporter(os.environ[TRACE_FILE_ENV])))
    if install:
        trace.set_tracer_provider(provider)
    return provider
