"""Exporters follow the standard OTEL_* variables; the controller imports no torch/workers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.telemetry import exporters_from_env, make_tracer_provider


def test_exporter_choice_follows_otel_variables():
    assert exporters_from_env({}) == []  # no collector configured: export nothing
    assert exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert isinstance(exporters_from_env({"OTEL_TRACES_EXPORTER": "console"})[0],
                      ConsoleSpanExporter)
    otlp = exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert type(otlp[0]).__module__.endswith("grpc.trace_exporter")
    http = exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp,console",
                               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert type(http[0]).__module__.endswith("http.trace_exporter") and len(http) == 2
    for bad, fragment in (({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
                          ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL":
                            "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'")):
        with pytest.raises(ValueError, match=fragment):
            exporters_from_env(bad)


def test_provider_carries_the_service_resource(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    spans = InMemorySpanExporter()
    provider = make_tracer_provider(exporters=[spans], synchronous=True)
    with provider.get_tracer("t").start_as_current_span("job.submit"):
        pass
    (span,) = spans.get_finished_spans()
    attrs = span.resource.attributes
    assert attrs["service.name"] == "ringmaster-controller"
    assert attrs["service.version"] and attrs["deployment.environment"] == "test"
    provider.shutdown()


def test_controller_imports_no_torch_and_no_workers():
    code = ("import sys, controller.server, controller.cli, controller.client, "
            "controller.preview; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('torch.', 'workers'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
