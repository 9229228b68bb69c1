"""The RPC edge: who is calling, and what a failure looks like on the wire, decided once for every RPC.

A grpc.aio server interceptor, so no servicer method authenticates or maps
errors itself (the servicers are thin calls into the domain):

- authentication: a device RPC (every DeviceService and TunnelService method but `Enroll`,
  which presents the bootstrap token in its body) needs a device credential
  (`device_auth.DeviceAuthenticator`); the calling device is then available
  to the servicer as `current_device()` (a ContextVar, per request). An
  AdminService RPC needs the admin token. Other services (StatsService,
  which checks the admin token itself) pass through untouched;
- error mapping: a typed `tether.common.errors.TetherError` becomes its gRPC
  status code with the error class in the `tether-error` trailing metadata
  (the admin client restores the class from it); database pool saturation
  becomes UNAVAILABLE (overload, not a bug: shed cheaply); anything else is
  logged and answered INTERNAL without leaking internals;
- a refused client stream (PutBlob) is read to its end, bounded, before the
  answer, so the client hears why instead of a transport reset.

The wrapped handler is built once per method, on its first call, and reused:
per call the interceptor costs one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg_pool

from tether.common import auth, errors
from tether.controller import device_auth, devices

log = logging.getLogger(__name__)

DEVICE_SERVICE = "tether.v1.DeviceService"
ADMIN_SERVICE = "tether.v1.AdminService"
TUNNEL_SERVICE = "tether.v1.TunnelService"  # device RPCs too (tether.controller.tunnel)
DEVICE_SERVICES = frozenset({DEVICE_SERVICE, TUNNEL_SERVICE})
PUBLIC_METHODS = frozenset({f"/{DEVICE_SERVICE}/Enroll"})

_device: contextvars.ContextVar[devices.Device | None] = contextvars.ContextVar("tether_device", default=None)
_overload_logged_at = -1e9

Authenticate = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def current_device() -> devices.Device:
    """The device whose authenticated call this is (set by the edge for every device RPC but Enroll)."""
    device = _device.get()
    if device is None:
        raise errors.Unauthenticated("no authenticated device for this call")
    return device


class Edge(grpc.aio.ServerInterceptor):
    def __init__(self, *, authenticator: device_auth.DeviceAuthenticator, admin_token: str) -> None:
        self._auth = authenticator
        self._admin_token = admin_token
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if method in PUBLIC_METHODS:
            wrapped = _mapped(handler, _anyone)
        elif service in DEVICE_SERVICES:
            wrapped = _mapped(handler, self._device)
        elif service == ADMIN_SERVICE:
            wrapped = _mapped(handler, self._admin)
        else:
            wrapped = handler
        self._handlers[method] = wrapped
        return wrapped

    async def _device(self, context: grpc.aio.ServicerContext) -> None:
        """The calling device: signed, unexpired credential of a live device (`device_auth`)."""
        token = auth.bearer_token(context.invocation_metadata())
        _device.set(await self._auth.authenticate(token))

    async def _admin(self, context: grpc.aio.ServicerContext) -> None:
        token = auth.bearer_token(context.invocation_metadata())
        if not auth.tokens_equal(token, self._admin_token):
            raise errors.Unauthenticated("invalid admin token")


async def _anyone(context: grpc.aio.ServicerContext) -> None:
    return None


def _mapped(handler: grpc.RpcMethodHandler, authenticate: Authenticate) -> grpc.RpcMethodHandler:
    """`handler` behind `authenticate`, with every failure mapped to a status (`abort`)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                await authenticate(context)
                return await unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(context, e)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                await authenticate(context)
                stream = streaming(request, context)
                try:
                    async for item in stream:
                        yield item
                finally:
                    await stream.aclose()  # run its `finally` now, not whenever it is garbage-collected
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                if context.done():  # the caller is gone (its connection dropped mid-stream): nobody to answer
                    log.debug("stream ended after its caller left: %s", type(e).__name__)
                    return
                await abort(context, e)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary is not None:
        client_streaming = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                try:
                    await authenticate(context)
                except errors.TetherError:
                    await drain(requests)
                    raise
                return await client_streaming(requests, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(context, e)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    return handler  # bidirectional streams: none in the API


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status `exc` maps to (always raises grpc.aio.AbortError)."""
    if isinstance(exc, errors.TetherError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        # Bounded: a message over gRPC's metadata limit would reach the caller as a transport error naming nothing.
        await context.abort(
            code, errors.bounded(str(exc)), trailing_metadata=((auth.ERROR_TYPE_METADATA, type(exc).__name__),)
        )
    if isinstance(exc, psycopg_pool.TooManyRequests | psycopg_pool.PoolTimeout):
        # Overload, not a bug: shed the request cheaply (no traceback per request); clients back off and retry.
        global _overload_logged_at
        if time.monotonic() - _overload_logged_at > 10:  # once per 10 s: a log line per request is load too
            _overload_logged_at = time.monotonic()
            log.warning("database pool saturated (%s): answering UNAVAILABLE", type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "controller busy; retry with backoff")
    log.exception("unexpected error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the controller log")


async def drain(messages: AsyncIterator[Any], *, max_bytes: int = 64 * 1024 * 1024, max_s: float = 5.0) -> None:
    """Read and drop what a refused client is still sending (bounded), before answering.

    A status sent while the client is still writing races with its writes, and
    the client may then see the transport's reset ("Internal error from Core")
    instead of the refusal; like an HTTP server's lingering close, reading the
    rest first lets the client hear why. Bounded in bytes and time: a client
    that keeps sending is cut off anyway.
    """
    total = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(max_s):
            async for message in messages:
                total += len(message) if isinstance(message, bytes) else len(getattr(message, "data", b""))
                if total > max_bytes:
                    return
