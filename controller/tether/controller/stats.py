"""Operational counters of one controller process, and the admin RPC that reads them.

`RpcCounters` is a server interceptor that wraps each method's (de)serializer,
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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tether.common import auth, errors
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


@dataclasses.dataclass
class MethodCounters:
    calls: int = 0
    request_messages: int = 0
    request_bytes: int = 0
    response_messages: int = 0
    response_bytes: int = 0


class RpcCounters(grpc.aio.ServerInterceptor):
    """Counts calls and serialized bytes per method (one dict update per message: cheap)."""

    def __init__(self) -> None:
        self.methods: dict[str, MethodCounters] = {}

    def _counters(self, method: str) -> MethodCounters:
        c = self.methods.get(method)
        if c is None:
            c = self.methods[method] = MethodCounters()
        return c

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        c = self._counters(handler_call_details.method)
        c.calls += 1
        return _counting_handler(handler, c)

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


def _counting_handler(handler: grpc.RpcMethodHandler, c: MethodCounters) -> grpc.RpcMethodHandler:
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
            return await _maybe_await(unary(await decode(raw, context), context))

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=count_request, response_serializer=response_serializer
        )
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            result = streaming(await decode(raw, context), context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                await _maybe_await(result)  # a method that writes with context.write (or is unimplemented)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=count_request, response_serializer=response_serializer
        )

    async def decoded(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await decode(raw, context)

    if handler.stream_unary is not None:
        client_streaming = handler.stream_unary

        async def stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await _maybe_await(client_streaming(decoded(raws, context), context))

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=count_request, response_serializer=response_serializer
        )
    bidi = handler.stream_stream

    async def stream_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
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
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL), str(e))
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
