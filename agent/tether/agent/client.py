"""Async gRPC client of the controller's DeviceService.

Every call but `enroll` carries `authorization: Bearer <credential>`
(docs/internals.md, "Auth metadata"). The channel is plaintext unless
`channel_credentials` is given (`tether.common.tls.ClientTLS.channel_credentials()`:
TLS trusting a CA, with a client certificate for mTLS). Errors are grpc.aio.AioRpcError;
callers decide what is retryable with `is_retryable`, and tell a `CallObserver`
about the failures they ride out (the agent logs them; the fleet simulator
counts them).

The channel opens on the first call, so an agent can be built before its
event loop runs. The fleet simulator passes a `channel` of its own instead:
many simulated devices share one connection.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

import grpc

from tether.common import auth, tracing
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.proto.v1 import tunnel_pb2, tunnel_pb2_grpc

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits in [(1 - jitter) * b, b], b = min(max, initial * m**n)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return base * (1.0 - self.jitter * rng.random())


DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # Reconnect promptly after a controller restart; the agent's own backoff paces its retries.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in RETRYABLE


def describe(e: BaseException) -> str:
    """An error in one line: `CODE: details` for an RPC error."""
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


class CallObserver(Protocol):
    """Told of each failed call that the caller rides out (retries, resumes, or gives up on)."""

    def failed(self, what: str, error: grpc.aio.AioRpcError, *, release: str = "") -> None:
        """`what`: the RPC (Enroll, Subscribe, PullBlobs); `release` where the call was for one."""


class DeviceClient:
    def __init__(
        self,
        target: str,
        *,
        credential: str = "",
        channel_credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, int | str]] = DEFAULT_OPTIONS,
        timeout_s: float = 30.0,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.credential = credential
        self.timeout_s = timeout_s
        self._channel_credentials = channel_credentials
        self._options = list(options)
        self._own_channel = channel is None  # a channel passed in is the caller's to close
        self._channel = channel
        self._device_stub = pb_grpc.DeviceServiceStub(channel) if channel is not None else None

    @property
    def _stub(self) -> pb_grpc.DeviceServiceStub:
        if self._device_stub is None:
            if self._channel_credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._channel_credentials, options=self._options)
            self._device_stub = pb_grpc.DeviceServiceStub(self._channel)
        return self._device_stub

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return auth.bearer_metadata(self.credential)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel this client opened (a later call opens a new one)."""
        if self._own_channel and self._channel is not None:
            channel, self._channel, self._device_stub = self._channel, None, None
            await channel.close(grace)

    async def __aenter__(self) -> DeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enroll(self, *, bootstrap_token: str, device: pb.DeviceInfo) -> pb.EnrollResponse:
        return await self._stub.Enroll(
            pb.EnrollRequest(bootstrap_token=bootstrap_token, device=device), timeout=self.timeout_s
        )

    async def renew_credential(self) -> pb.RenewCredentialResponse:
        """A fresh credential for this device (the current one must still be valid; it stops working)."""
        return await self._stub.RenewCredential(
            pb.RenewCredentialRequest(), metadata=self._metadata(), timeout=self.timeout_s
        )

    def subscribe(self, installed: Iterable[pb.DesiredTask]) -> grpc.aio.UnaryStreamCall:
        """The long-lived event stream; iterate it with `async for` and `cancel()` it to stop."""
        return self._stub.Subscribe(pb.SubscribeRequest(installed=list(installed)), metadata=self._metadata())

    async def get_desired(self) -> pb.Sync:
        """The desired state, asked for (what a polling device does instead of holding the stream)."""
        return await self._stub.GetDesired(pb.GetDesiredRequest(), metadata=self._metadata(), timeout=self.timeout_s)

    async def get_manifest(self, *, release: str, manifest_digest: str) -> pb.GetManifestResponse:
        return await self._stub.GetManifest(
            pb.GetManifestRequest(release=release, manifest_digest=manifest_digest),
            metadata=self._metadata(),
            timeout=self.timeout_s,
        )

    async def pull_blob(
        self, *, release: str, digest: str, offset: int = 0, timeout_s: float | None = None
    ) -> AsyncIterator[pb.BlobChunk]:
        call = self._stub.PullBlob(
            pb.PullBlobRequest(release=release, digest=digest, offset=offset),
            metadata=self._metadata(),
            timeout=timeout_s,
        )
        async for chunk in _chunks(call):
            yield chunk

    async def pull_blobs(
        self, *, release: str, blobs: Sequence[tuple[str, int]], timeout_s: float | None = None
    ) -> AsyncIterator[pb.BlobChunk]:
        """Several blobs of `release` in one stream: (digest, offset) pairs, at most `MAX_BLOBS_PER_PULL`.

        Chunks come in request order, each carrying its blob's digest (docs/internals.md, "Pull").
        A controller without PullBlobs answers UNIMPLEMENTED; the caller falls back to `pull_blob`.
        """
        call = self._stub.PullBlobs(
            pb.PullBlobsRequest(
                release=release, blobs=[pb.BlobRange(digest=digest, offset=offset) for digest, offset in blobs]
            ),
            metadata=self._metadata(),
            timeout=timeout_s,
        )
        async for chunk in _chunks(call):
            yield chunk

    async def report_status(
        self,
        *,
        release: str,
        version: int,
        state: pb.DeliveryState,
        message: str = "",
        device_state: Mapping[str, str] | None = None,
        url_failures: Mapping[str, int] | None = None,
    ) -> None:
        await self._stub.ReportStatus(
            pb.ReportStatusRequest(
                release=release,
                version=version,
                state=state,
                message=message[:1000],
                device_state=dict(device_state or {}),
                url_failures=dict(url_failures or {}),
            ),
            metadata=self._metadata(),
            timeout=self.timeout_s,
        )

    async def upload_result(self, request: pb.UploadResultRequest) -> pb.UploadResultResponse:
        metadata = tracing.metadata(self._metadata())  # the controller's span joins the run's trace
        return await self._stub.UploadResult(request, metadata=metadata, timeout=self.timeout_s)

    async def push_update(self, header: pb.UpdateHeader, data: bytes) -> pb.PushUpdateResponse:
        """Send a federated round's update (header, then 1 MiB chunks)."""
        from tether.agent import round_update

        return await self._stub.PushUpdate(
            round_update.chunks(header, data), metadata=self._metadata(), timeout=max(self.timeout_s, 300.0)
        )

    async def report_backends(self, request: pb.ReportBackendsRequest) -> pb.ReportBackendsResponse:
        return await self._stub.ReportBackends(request, metadata=self._metadata(), timeout=self.timeout_s)

    async def emit(self, batch: tunnel_pb2.EmitBatch) -> tunnel_pb2.EmitAck:
        """One tunnel batch (`tether.agent.tunnel.uplink`), gzip-compressed, on the same channel and credential."""
        self._stub  # noqa: B018  # opens the channel
        stub = tunnel_pb2_grpc.TunnelServiceStub(self._channel)
        return await stub.Emit(
            batch, metadata=self._metadata(), timeout=self.timeout_s, compression=grpc.Compression.Gzip
        )


async def _chunks(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.BlobChunk]:
    """A pull's chunks; the call is cancelled however the caller stops reading (no stream left open)."""
    try:
        async for chunk in call:
            yield chunk
    finally:
        call.cancel()
