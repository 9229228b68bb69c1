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
