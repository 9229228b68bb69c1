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

OpenTelemetry's official instrumentations join in where they fit (`instrument`):
`grpc-server` (an RPC span per call of a `grpc.aio` server, context from the
call's metadata), `grpc-client` (a span per call of a `grpc.aio` channel, context
into its metadata), `celery` (publish and run spans, context in the message's
headers) and `psycopg` (a span per statement; `db.open_pool` and the worker's pool
instrument each connection they open). Where one is on, Tether's own spans become
its children and Tether stops carrying that hop's context itself (`extract(...,
via=...)` and `metadata` defer to it); where it is not installed (a device: the
`agent` extra carries only the SDK) the hop is carried by hand as before.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

TRACER_NAME = "tether"
_state: dict[str, Any] = {"active": False, "provider": None, "instrumented": {}}

# The official instrumentations Tether uses, by the name `instrument` takes: (module, class).
INSTRUMENTATIONS = {
    "grpc-server": ("opentelemetry.instrumentation.grpc", "GrpcAioInstrumentorServer"),
    "grpc-client": ("opentelemetry.instrumentation.grpc", "GrpcAioInstrumentorClient"),
    "celery": ("opentelemetry.instrumentation.celery", "CeleryInstrumentor"),
    "psycopg": ("opentelemetry.instrumentation.psycopg", "PsycopgInstrumentor"),
}


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


def configure(service_name: str, *, environ: Mapping[str, str] | None = None, instrument_: Sequence[str] = ()) -> bool:
    """Install the SDK's tracer provider with the OTLP (or console) exporter when the environment asks for it.

    Returns whether tracing is on; when it is, the official instrumentations named in `instrument_` are turned
    on too (`instrument`). Without the SDK installed (a device with the base package only), it stays off with a
    warning.
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
    instrument(*instrument_)
    return True


def use_provider(provider: Any) -> None:
    """Record Tether's spans through `provider` (an SDK TracerProvider), or stop recording them (None).

    Tests install one with an in-memory exporter and remove it afterwards; the global provider of
    OpenTelemetry can be set only once per process, so Tether keeps its own reference.
    """
    _state["provider"] = provider
    _state["active"] = provider is not None
    if provider is None:
        uninstrument()


def instrument(*names: str) -> tuple[str, ...]:
    """Turn on the official instrumentations `names` (keys of INSTRUMENTATIONS) for the active provider.

    Returns those now on. Nothing happens while tracing is off; one whose package is missing stays off with a
    warning (Tether then carries that hop's context itself). Call it before creating servers, channels and
    pools: `grpc.aio.server` and `grpc.aio.*_channel` are wrapped at creation.
    """
    if not _state["active"]:
        return ()
    for name in names:
        if name in _state["instrumented"]:
            continue
        if name not in INSTRUMENTATIONS:
            raise ValueError(f"unknown instrumentation {name!r}; known: {', '.join(sorted(INSTRUMENTATIONS))}")
        module_name, class_name = INSTRUMENTATIONS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            log.warning("%s is not installed; Tether carries this hop's trace context itself", module_name)
            continue
        instrumentor = getattr(module, class_name)(**_options(name))
        if name != "psycopg":  # psycopg: per connection (`instrument_connection`), pools wrap what they open
            instrumentor.instrument(tracer_provider=_state["provider"])
        _state["instrumented"][name] = instrumentor
    return tuple(_state["instrumented"])


def client_streaming_methods() -> tuple[str, ...]:
    """Full names of Tether's client-streaming RPCs ("/tether.v1.AdminService/PutBlob", ...)."""
    from tether.proto.v1 import tether_pb2

    return tuple(
        f"/{service.full_name}/{method.name}"
        for service in tether_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.client_streaming
    )


def _options(name: str) -> dict[str, Any]:
    if name != "grpc-client":
        return {}
    # Its stream-request interceptor awaits the response before handing the call back, so a call fed with
    # `call.write()` (PutBlob's upload) would wait forever: client-streaming calls are left out (untraced,
    # as they are without it).
    from opentelemetry.instrumentation.grpc import filters

    return {"filter_": filters.negate(filters.any_of(*map(filters.full_method_name, client_streaming_methods())))}


def uninstrument() -> None:
    """Turn every official instrumentation off again (tests; `use_provider(None)`)."""
    for name, instrumentor in list(_state["instrumented"].items()):
        if name != "psycopg":
            instrumentor.uninstrument()
        del _state["instrumented"][name]


def instrumented(name: str) -> bool:
    """Whether the official instrumentation `name` is on in this process."""
    return name in _state["instrumented"]


def instrument_connection(conn: Any) -> None:
    """A psycopg connection a pool just opened: its statements become spans when `psycopg` is instrumented."""
    instrumentor = _state["instrumented"].get("psycopg")
    if instrumentor is not None:
        instrumentor.instrument_connection(conn, tracer_provider=_state["provider"])


def tracer() -> trace.Tracer:
    provider = _state["provider"]
    return provider.get_tracer(TRACER_NAME) if provider is not None else trace.get_tracer(TRACER_NAME)


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current context as W3C headers (`traceparent`, `tracestate`); empty when tracing is off."""
    out: dict[str, str] = {} if carrier is None else dict(carrier)
    if _state["active"]:
        propagate.inject(out)
    return out


def extract(
    carrier: Mapping[str, str] | Sequence[tuple[str, Any]] | None, *, via: str | None = None
) -> otel_context.Context | None:
    """The context a carrier (headers, a Notify's map, gRPC invocation metadata) brought; None without one.

    `via`: the official instrumentation of this hop; while it is on, its span is already the current one (a
    child of the remote context), so None is returned and callers' spans become its children.
    """
    if not _state["active"] or not carrier or (via is not None and via in _state["instrumented"]):
        return None
    headers = dict(carrier) if not isinstance(carrier, Mapping) else carrier
    if "traceparent" not in headers:
        return None
    return propagate.extract({k: str(v) for k, v in headers.items() if isinstance(v, str)})


def metadata(base: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata: `base` plus the current trace context (just `base` when tracing is off, or when the
    official gRPC client instrumentation injects it)."""
    if not _state["active"] or "grpc-client" in _state["instrumented"]:
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
