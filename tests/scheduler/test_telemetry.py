"""The shared tracing set-up: OTEL_* exporter choice and the JSON-lines span file."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from scheduler.telemetry import (
    TRACE_FILE_ENV,
    JsonLinesSpanExporter,
    make_tracer_provider,
    read_trace_file,
)


def test_json_lines_file_keeps_parent_links_and_filters(tmp_path):
    path = tmp_path / "trace.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(
        path, keep=lambda s: s.name != "noise")))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer") as outer:
        with tracer.start_as_current_span("inner"):
            pass
    with tracer.start_as_current_span("noise"):
        pass
    spans = read_trace_file(path)
    assert [s["name"] for s in spans] == ["inner", "outer"]
    trace_id = f"0x{outer.get_span_context().trace_id:032x}"
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}
    assert spans[0]["parent_id"] == f"0x{outer.get_span_context().span_id:016x}"


def test_trace_file_env_adds_the_file_exporter(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    monkeypatch.setenv(TRACE_FILE_ENV, str(path))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    provider = make_tracer_provider(default_service_name="ringmaster-worker")
    with provider.get_tracer("w").start_as_current_span("worker.step"):
        pass
    provider.shutdown()
    (span,) = read_trace_file(path)
    assert span["name"] == "worker.step"
    assert span["resource"]["attributes"]["service.name"] == "ringmaster-worker"
