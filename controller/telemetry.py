"""OpenTelemetry for the controller: one tracer provider, exporters from OTEL_* variables.

`make_tracer_provider()` is scheduler.telemetry's (shared with the workers) with the
service name defaulting to "ringmaster-controller"; see there for how OTEL_* variables
choose the exporters. Tests pass their own exporter (in-memory).
The provider is passed around explicitly, never installed as a global behind callers' backs
(`install=True` does so for `ringmaster serve`).
"""

from __future__ import annotations

import logging

from opentelemetry.sdk.trace import TracerProvider

from scheduler.telemetry import EXPORTERS, SERVICE_VERSION, exporters_from_env
from scheduler.telemetry import make_tracer_provider as _make_provider

log = logging.getLogger(__name__)

SERVICE_NAME = "ringmaster-controller"
__all__ = ["EXPORTERS", "SERVICE_NAME", "SERVICE_VERSION", "exporters_from_env",
           "instrument_fastapi", "instrument_redis", "make_tracer_provider"]


def make_tracer_provider(**kwargs) -> TracerProvider:
    """scheduler.telemetry.make_tracer_provider with the controller's service name."""
    return _make_provider(default_service_name=SERVICE_NAME, **kwargs)


def instrument_redis(client, provider: TracerProvider) -> None:
    """Trace every command of this one client (not a global patch of redis-py)."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=provider)


def instrument_fastapi(app, provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       excluded_urls="healthz,readyz")
