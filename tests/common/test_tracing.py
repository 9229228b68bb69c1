"""tether.common.tracing: off by default at no cost, on through the OTEL_* variables, never fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tether.common import tracing


def test_off_by_default_carries_nothing() -> None:
    assert not tracing.active()
    assert tracing.inject() == {}
    assert tracing.metadata((("authorization", "Bearer x"),)) == (("authorization", "Bearer x"),)
    assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
    with tracing.span("anything") as span:
        assert span is None


def test_the_environment_decides() -> None:
    assert not tracing.requested({})
    assert tracing.requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert tracing.requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert not tracing.requested({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert tracing.configure("test", environ={}) is False


def test_context_round_trip_through_a_carrier() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use_provider(provider)
    try:
        with tracing.span("sender"):
            carrier = tracing.inject()
            md = tracing.metadata((("authorization", "Bearer x"),))
        assert set(carrier) >= {"traceparent"}
        assert md[0] == ("authorization", "Bearer x") and ("traceparent", carrier["traceparent"]) in md
        with tracing.span("receiver", parent=tracing.extract(md)):
            pass
        assert tracing.extract({}) is None and tracing.extract({"other": "x"}) is None
    finally:
        tracing.use_provider(None)
    sender, receiver = (s for s in spans.get_finished_spans() if s.name in ("sender", "receiver"))
    assert receiver.context.trace_id == sender.context.trace_id
    assert receiver.parent.span_id == sender.context.span_id


def test_an_unreachable_collector_never_blocks_or_crashes_a_component() -> None:
    script = (
        "from tether.common import tracing\n"
        "assert tracing.configure('probe')\n"
        "with tracing.span('work'):\n"
        "    pass\n"
        "print('done', flush=True)\n"
    )
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert time.monotonic() - started < 30


def test_official_instrumentations_follow_the_provider_and_step_aside_for_context() -> None:
    import grpc
    import pytest

    assert tracing.instrument("grpc-server") == ()  # tracing off: nothing is patched
    original_server, original_channel = grpc.aio.server, grpc.aio.insecure_channel
    provider = TracerProvider()
    tracing.use_provider(provider)
    try:
        with pytest.raises(ValueError, match="unknown instrumentation 'grpc'"):
            tracing.instrument("grpc")
        assert tracing.instrument("grpc-server", "grpc-client") == ("grpc-server", "grpc-client")
        assert grpc.aio.server is not original_server and grpc.aio.insecure_channel is not original_channel
        carrier = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        assert tracing.extract(carrier, via="grpc-server") is None  # the RPC span is already current
        assert tracing.extract(carrier) is not None
        assert tracing.metadata((("a", "b"),)) == (("a", "b"),)  # the client interceptor injects it
        assert "/tether.v1.AdminService/PutBlob" in tracing.client_streaming_methods()
    finally:
        tracing.use_provider(None)
        provider.shutdown()
    assert grpc.aio.server is original_server and grpc.aio.insecure_channel is original_channel
    assert not tracing.instrumented("grpc-server")


def test_a_missing_instrumentation_leaves_the_hop_to_tether(monkeypatch, caplog) -> None:
    import importlib

    real = importlib.import_module

    def without_celery(name: str, *args, **kwargs):
        if name == "opentelemetry.instrumentation.celery":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_celery)
    provider = TracerProvider()
    tracing.use_provider(provider)
    try:
        assert tracing.instrument("celery") == ()
        assert "opentelemetry.instrumentation.celery is not installed" in caplog.text
        assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, via="celery") is not None
    finally:
        tracing.use_provider(None)
        provider.shutdown()
