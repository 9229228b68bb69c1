"""What observability costs the controller: `tether bench fleet --observability both`.

The same fleet benchmark runs twice in one invocation, on the same machine: once
with the controller's `/metrics` not served and tracing off, once with `/metrics`
served and scraped every second (a stricter interval than any Prometheus setup)
and OpenTelemetry on, exporting every span over OTLP/gRPC to a collector stand-in
in this process (`SpanSink`, which counts what it receives: the export cost is
real, serialization and network included). The result carries

- `observability_install_ratio`: install throughput (devices / seconds from the
  apply to the last install) with observability on ÷ off (≥ 0.95 wanted);
- `observability_cpu_ratio`: controller CPU seconds of the rollout on ÷ off
  (same number of installs, so it is CPU per install; ≤ 1.05 wanted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

MODES = ("off", "on", "both")
SCRAPE_INTERVAL_S = 1.0


class SpanSink(otlp_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts spans (a collector stand-in on loopback).

    A thread-pool server, not one on the benchmark's event loop: the loop blocks while the stack stops,
    which is exactly when the controller flushes its last spans.
    """

    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0
        self._lock = threading.Lock()

    def Export(self, request: otlp.ExportTraceServiceRequest, context: Any) -> otlp.ExportTraceServiceResponse:
        with self._lock:
            self.requests += 1
            self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return otlp.ExportTraceServiceResponse()


@contextlib.asynccontextmanager
async def span_sink() -> Any:
    sink = SpanSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    otlp_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield sink, f"http://127.0.0.1:{port}"
    finally:
        server.stop(1).wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper:
    """Scrape a /metrics URL every `interval_s` on a thread, as Prometheus would; count what it got."""

    def __init__(self, url: str, *, interval_s: float = SCRAPE_INTERVAL_S) -> None:
        self.url = url
        self.interval_s = interval_s
        self.scrapes = 0
        self.failures = 0
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.last_bytes = len(response.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1  # the controller not up yet, or stopping


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the stack starts (its processes inherit them), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def throughput(result: dict[str, Any]) -> float:
    wall = float(result["details"]["v1"]["wall_s"])
    return result["agents"] / wall if wall > 0 else 0.0


RunOne = Callable[[tuple[str, ...], str], Awaitable[dict[str, Any]]]


async def measured_on(run: RunOne) -> tuple[dict[str, Any], dict[str, Any]]:
    """One benchmark run with metrics served and scraped and traces exported; its result and what was observed."""
    port = free_port()
    async with span_sink() as (sink, endpoint):
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": "tether-controller-bench",
        }
        with environment(otel), Scraper(f"http://127.0.0.1:{port}/metrics") as scraper:
            result = await run(("--metrics-port", str(port)), "on")
        await asyncio.sleep(1)  # the controller flushed its spans when it stopped (the SDK's exit hook)
    observed = {
        "metrics_scrapes": scraper.scrapes,
        "metrics_scrape_failures": scraper.failures,
        "metrics_bytes_per_scrape": scraper.last_bytes,
        "spans_exported": sink.spans,
        "otlp_requests": sink.requests,
        "scrape_interval_s": SCRAPE_INTERVAL_S,
    }
    return result, observed


def compare(off: dict[str, Any], on: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    """The two ratios and their baselines."""
    off_cpu = float(off["details"]["v1"]["server_cpu_s"])
    on_cpu = float(on["details"]["v1"]["server_cpu_s"])
    off_rate, on_rate = throughput(off), throughput(on)
    return {
        "observability_install_ratio": round(on_rate / off_rate, 4) if off_rate else None,
        "observability_cpu_ratio": round(on_cpu / off_cpu, 4) if off_cpu else None,
        "baseline": {
            "off": {"installs_per_s": round(off_rate, 2), "server_cpu_s": off_cpu, "install_s": off["install_s"]},
            "on": {"installs_per_s": round(on_rate, 2), "server_cpu_s": on_cpu, "install_s": on["install_s"]},
            **observed,
        },
    }
