"""Operational counters of one controller process, and the admin RPC that reads them.

`RpcCounters` wraps each method's handler and (de)serializer once, when a servicer is added,
so it counts exactly the protobuf bytes the server read and wrote, per method
and per direction, for unary and streaming RPCs alike, without touching the
servicers (HTTP/2 framing and TLS are not included). It also parses requests
inside the call, so a malformed message is answered INVALID_ARGUMENT rather
than grpcio's UNKNOWN-plus-traceback.

`process_stats` reads this process's resident memory, CPU time and open file
descriptors from /proc (Linux) with a portable fallback.

`StatsService.GetServerStats` returns both, plus what the hub and the replica
listener know; it is authenticated with the admin token.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from tether.common import auth, errors
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tether.controller import instruments


@dataclasses.dataclass
class MethodCounters:
    calls: int = 0
    request_messages: int = 0
    request_bytes: int = 0
    response_messages: int = 0
    response_bytes: int = 0


class RpcCounters:
    """Counts calls and serialized bytes per method (one dict update per message: cheap).

    Not an interceptor: a server interceptor runs Python on every call (the
    handler lookup, a wrapper built per call) and keeps grpcio off its
    registered-method fast path. `add_servicer` wraps each method handler once,
    when the servicer is added to the server.
    """

    def __init__(self, *, metrics: instruments.ControllerMetrics | None = None) -> None:
        self._all: dict[str, MethodCounters] = {}
        self._metrics = metrics  # latency histograms (tether_controller_rpc_duration_seconds), bound per method

    @property
    def methods(self) -> dict[str, MethodCounters]:
        """Counters of the methods called so far, by full method name."""
        return {name: c for name, c in self._all.items() if c.calls}

    def _counters(self, method: str) -> MethodCounters:
        c = self._all.get(method)
        if c is None:
            c = self._all[method] = MethodCounters()
        return c

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
        """`add_XServicer_to_server(servicer, server)` of the generated code, every method counted."""
        capture = _Registrations()
        add_to_server(servicer, capture)
        for service, handlers in capture.registered:
            wrapped = {
                name: _counting_handler(
                    handler,
                    self._counters(f"/{service}/{name}"),
                    None if self._metrics is None else self._metrics.rpc_timer(f"/{service}/{name}"),
                )
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)

    def snapshot(self) -> list[pb.RpcStats]:
        return [
            pb.RpcStats(
                method=name,
                calls=c.calls,
                request_messages=c.request_messages,
                request_bytes=c.request_bytes,
                response_messages=c.response_messages,
                response_bytes=c.response_bytes,
            )
            for name, c in sorted(self.methods.items())
        ]


class _Registrations:
    """Stands in for the server while generated code adds a servicer: keeps its method handlers."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers also come by name, through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered.append((service, dict(handlers)))


def _counting_handler(handler: grpc.RpcMethodHandler, c: MethodCounters, timer: Any = None) -> grpc.RpcMethodHandler:
    """The same method, counting bytes, and parsing requests itself so that bad bytes get INVALID_ARGUMENT.

    grpcio answers a request its deserializer cannot parse with UNKNOWN (and logs a traceback);
    a malformed message is the caller's error, so it is parsed here, inside the call, and refused cleanly.
    """
    deserialize = handler.request_deserializer
    serialize = handler.response_serializer

    def count_request(data: bytes) -> bytes:
        c.request_messages += 1
        c.request_bytes += len(data)
        return data

    def response_serializer(message: Any) -> bytes:
        data = serialize(message) if serialize is not None else message
        c.response_messages += 1
        c.response_bytes += len(data)
        return data

    async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: not a valid protobuf message")

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            c.calls += 1
            if timer is None:
                return await _maybe_await(unary(await decode(raw, context), context))
            started = time.perf_counter()
            try:
                return await _maybe_await(unary(await decode(raw, context), context))
            finally:
                timer.observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=count_request, response_serializer=response_serializer
        )
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            c.calls += 1
            started = time.perf_counter()
            result = streaming(await decode(raw, context), context)
            try:
                if hasattr(result, "__aiter__"):
                    try:
                        async for item in result:
                            yield item
                    finally:
                        if hasattr(result, "aclose"):
                            await result.aclose()  # its `finally` runs now, when this stream is closed
                else:
                    await _maybe_await(result)  # a method that writes with context.write (or is unimplemented)
            finally:
                if timer is not None:  # a pull: from its arrival to its last chunk (queueing for a slot included)
                    timer.observe(time.perf_counter() - started)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=count_request, response_serializer=response_serializer
        )

    async def decoded(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await decode(raw, context)

    if handler.stream_unary is not None:
        client_streaming = handler.stream_unary

        async def stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            c.calls += 1
            started = time.perf_counter()
            try:
                return await _maybe_await(client_streaming(decoded(raws, context), context))
            finally:
                if timer is not None:
                    timer.observe(time.perf_counter() - started)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=count_request, response_serializer=response_serializer
        )
    bidi = handler.stream_stream

    async def stream_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        c.calls += 1
        result = bidi(decoded(raws, context), context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await _maybe_await(result)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, request_deserializer=count_request, response_serializer=response_serializer
    )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclasses.dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int
    cpu_seconds: float
    open_fds: int


def process_stats() -> ProcessStats:
    """This process's resident set size, CPU time (user + system) and open descriptors."""
    rss = 0
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current: a fallback
    times = os.times()
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return ProcessStats(rss_bytes=rss, cpu_seconds=times.user + times.system, open_fds=fds)


class StatsService(pb_grpc.StatsServiceServicer):
    """`GetServerStats`: counters of this process, for operators and `tether bench fleet`."""

    def __init__(
        self,
        *,
        admin_token: str,
        replica_id: str,
        counters: RpcCounters,
        connected: Callable[[], int],
        remote_changes: Callable[[], int],
        dropped: Callable[[], int],
    ) -> None:
        self._admin_token = admin_token
        self._replica_id = replica_id
        self._counters = counters
        self._connected = connected
        self._remote_changes = remote_changes
        self._dropped = dropped

    async def GetServerStats(
        self, request: pb.GetServerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStats:
        try:
            token = auth.bearer_token(context.invocation_metadata())
            if not auth.tokens_equal(token, self._admin_token):
                raise errors.Unauthenticated("invalid admin token")
        except errors.TetherError as e:
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL), errors.bounded(str(e)))
        proc = process_stats()
        return pb.ServerStats(
            replica_id=self._replica_id,
            connected_devices=self._connected(),
            rss_bytes=proc.rss_bytes,
            cpu_seconds=proc.cpu_seconds,
            open_fds=proc.open_fds,
            rpcs=self._counters.snapshot(),
            remote_changes=self._remote_changes(),
            dropped_slow_devices=self._dropped(),
        )
