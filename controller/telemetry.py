"""OpenTelemetry for the controller: one tracer provider, exporters from OTEL_* variables.

`make_tracer_provider()` builds a provider whose resource carries service.name
(`OTEL_SERVICE_NAME`, default "ringmaster-controller"), service.version and anything in
`OTEL_RESOURCE_ATTRIBUTES`. The exporter follows `OTEL_TRACES_EXPORTER`: `otlp` (endpoint
and protocol from the standard `OTEL_EXPORTER_OTLP_*` variables), `console`, or `none`.
Unset, it is `otlp` when an OTLP endpoint is configured and `none` otherwise, so a laptop
without a collector does not log export errors. Tests pass their own exporter (in-memory).
The provider is passed around explicitly, never installed as a global behind callers' backs
(`install=True` does so for `ringmaster serve`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "ringmaster-controller"
SERVICE_VERSION = "0.1.0"
EXPORTERS = ("otlp", "console", "none")


def exporters_from_env(env: dict[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER asks for (comma-separated list)."""
    env = dict(os.environ) if env is None else env
    default = "otlp" if any(k in env for k in ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) else "none"
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", default).split(",") if n.strip()]
    out: list[SpanExporter] = []
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; valid: "
                             f"{', '.join(EXPORTERS)}")
        if name == "console":
            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            out.append(_otlp_exporter(env))
    return out


def _otlp_exporter(env: dict[str, str]) -> SpanExporter:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                       env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; valid: "
                         "grpc, http/protobuf")
    return OTLPSpanExporter()  # reads endpoint, headers, TLS from the OTEL_* variables


def make_tracer_provider(*, exporters: Sequence[SpanExporter] | None = None,
                         synchronous: bool = False, install: bool = False,
                         service_name: str | None = None) -> TracerProvider:
    """A provider with the service resource and the given (or OTEL_*-chosen) exporters.

    `synchronous` exports each span as it ends (tests); otherwise spans are batched.
    """
    resource = Resource.create({
        "service.name": service_name or os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME),
        "service.version": SERVICE_VERSION,
        "service.namespace": "ringmaster",
    })
    provider = TracerProvider(resource=resource)
    for exporter in (exporters_from_env() if exporters is None else exporters):
        processor = SimpleSpanProcessor if synchronous else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    if install:
        trace.set_tracer_provider(provider)
    return provider


def instrument_redis(client, provider: TracerProvider) -> None:
    """Trace every command of this one client (not a global patch of redis-py)."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=provider)


def instrument_fastapi(app, provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       excluded_urls="healthz,readyz")
