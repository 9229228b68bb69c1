"""OpenTelemetry traces across the operator, the controller, the agent and the worker.

One trace follows a release: the operator's reconcile → `ApplyRelease` → the
`Notify` pushed to each device → the device's pull, install, run and upload →
`UploadResult` → the Celery aggregation. The W3C trace context travels in gRPC
metadata (`traceparent`, `tracestate`), in `Notify.trace_context` (a push has
no metadata of its own), and in the Celery message's headers.

Configured by the standard variables, read by the SDK itself:
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp|console`) turns it on; `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_*`
(protocol grpc, headers, certificates, timeout) apply as documented by
OpenTelemetry; `OTEL_SDK_DISABLED=true` turns it off. Spans leave through a
batch processor on its own thread: an unreachable collector costs logged
warnings and dropped spans, never a blocked or crashed component.

Off (the default) costs nothing: `active()` is one attribute read, callers skip
span and context work when it is false, and the API's no-op tracer is never
reached on a hot path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

TRACER_NAME = "tether"
_state: dict[str, Any] = {"active": False, "provider": None}


def active() -> bool:
    """Whether spans are recorded in this process (a provider was configured)."""
    return bool(_state["active"])


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(service_name: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Install the SDK's tracer provider with the OTLP (or console) exporter when the environment asks for it.

    Returns whether tracing is on. Without the SDK installed (a device with the base package only), it stays
    off with a warning.
    """
    env = os.environ if environ is None else environ
    if not requested(env):
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warning("OTEL_* asks for traces but opentelemetry-sdk is not installed; tracing stays off")
        return False
    exporter: SpanExporter
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("opentelemetry-exporter-otlp-proto-grpc is not installed; tracing stays off")
            return False
        exporter = OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # for instrumentation libraries too
    use_provider(provider)
    return True


def use_provider(provider: Any) -> None:
    """Record Tether's spans through `provider` (an SDK TracerProvider), or stop recording them (None).

    Tests install one with an in-memory exporter and remove it afterwards; the global provider of
    OpenTelemetry can be set only once per process, so Tether keeps its own reference.
    """
    _state["provider"] = provider
    _state["active"] = provider is not None


def tracer() -> trace.Tracer:
    provider = _state["provider"]
    return provider.get_tracer(TRACER_NAME) if provider is not None else trace.get_tracer(TRACER_NAME)


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current context as W3C headers (`traceparent`, `tracestate`); empty when tracing is off."""
    out: dict[str, str] = {} if carrier is None else dict(carrier)
    if _state["active"]:
        propagate.inject(out)
    return out


def extract(carrier: Mapping[str, str] | Sequence[tuple[str, Any]] | None) -> otel_context.Context | None:
    """The context a carrier (headers, a Notify's map, gRPC invocation metadata) brought; None without one."""
    if not _state["active"] or not carrier:
        return None
    headers = dict(carrier) if not isinstance(carrier, Mapping) else carrier
    if "traceparent" not in headers:
        return None
    return propagate.extract({k: str(v) for k, v in headers.items() if isinstance(v, str)})


def metadata(base: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata: `base` plus the current trace context (just `base` when tracing is off)."""
    if not _state["active"]:
        return tuple(base)
    return (*base, *inject().items())


@contextlib.contextmanager
def span(name: str, *, parent: otel_context.Context | None = None, **attributes: Any) -> Iterator[Any]:
    """A span as the current one (child of `parent` when given, else of the current span); no-op when off."""
    if not _state["active"]:
        yield None
        return
    with tracer().start_as_current_span(name, context=parent, attributes=attributes or None) as current:
        yield current
