"""Async gRPC client of the controller's DeviceService.

Every call but `enroll` carries `authorization: Bearer <credential>`
(docs/internals.md, "Auth metadata"). The channel is plaintext unless
`channel_credentials` is given (`tether.common.tls.ClientTLS.channel_credentials()`:
TLS trusting a CA, with a client certificate for mTLS). Errors are grpc.aio.AioRpcError;
callers decide what is retryable with `is_retryable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc

from tether.common import auth
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

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


# An install still running after this long is reported DOWNLOADING; a quicker one goes from NOTIFIED
# straight to INSTALLED (one call and one database write less per device when a whole fleet installs).
DOWNLOADING_REPORT_AFTER_S = 1.0

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


class DeviceClient:
    def __init__(
        self,
        target: str,
        *,
        credential: str = "",
        channel_credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, int | str]] = DEFAULT_OPTIONS,
        timeout_s: float = 30.0,
    ) -> None:
        self.target = target
        self.credential = credential
        self.timeout_s = timeout_s
        if channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=list(options))
        else:
            self._channel = grpc.aio.secure_channel(target, channel_credentials, options=list(options))
        self._stub = pb_grpc.DeviceServiceStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return auth.bearer_metadata(self.credential)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

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
        state: pb.DeliveryState.ValueType,
        message: str = "",
        device_state: Mapping[str, str] | None = None,
    ) -> None:
        await self._stub.ReportStatus(
            pb.ReportStatusRequest(
                release=release,
                version=version,
                state=state,
                message=message[:1000],
                device_state=dict(device_state or {}),
            ),
            metadata=self._metadata(),
            timeout=self.timeout_s,
        )

    async def upload_result(self, request: pb.UploadResultRequest) -> pb.UploadResultResponse:
        return await self._stub.UploadResult(request, metadata=self._metadata(), timeout=self.timeout_s)

    async def report_backends(self, request: pb.ReportBackendsRequest) -> pb.ReportBackendsResponse:
        return await self._stub.ReportBackends(request, metadata=self._metadata(), timeout=self.timeout_s)


async def _chunks(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.BlobChunk]:
    """A pull's chunks; the call is cancelled however the caller stops reading (no stream left open)."""
    try:
        async for chunk in call:
            yield chunk
    finally:
        call.cancel()


class LateReport:
    """A progress report sent only if the work it describes is still going after `after_s`.

    `settle()` (in a `finally` around the work) cancels a report not yet begun,
    or waits for one already on its way, so it can never arrive after the
    report that ends the work (both carry the same version: the later write
    wins).
    """

    def __init__(self, send: Callable[[], Awaitable[None]], *, after_s: float | None = None) -> None:
        self._send = send
        self._after_s = DOWNLOADING_REPORT_AFTER_S if after_s is None else after_s
        self.sent = False
        self._task = asyncio.create_task(self._run(), name="late-report")

    async def _run(self) -> None:
        await asyncio.sleep(self._after_s)
        self.sent = True
        await self._send()

    async def settle(self) -> None:
        if not self.sent:
            self._task.cancel()
        # Wait without awaiting the task itself: a cancellation of the caller must reach the caller, not be
        # taken for the report's. A lost progress report changes nothing: its outcome is read and dropped.
        try:
            await asyncio.wait({self._task})
        except asyncio.CancelledError:
            self._task.cancel()  # the caller is going away (shutdown): so is its report
            raise
        if not self._task.cancelled():
            self._task.exception()


class NotifyExtras:
    """What a Notify carries beside its task, kept until the install it announces starts.

    The manifest (`Notify.manifest`: GetManifest's answer, checked like it at install) by digest, a
    bounded few; and the moment the release's pull may start (`Notify.pull_spread_ms`,
    `pull_moment`). The real agent and the fleet simulator keep them the same way.
    """

    MAX_MANIFESTS = 64

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._manifests: dict[str, pb.GetManifestResponse] = {}
        self._pull_at: dict[str, float] = {}

    def heard(self, notify: pb.Notify, *, now: float) -> None:
        if notify.HasField("manifest"):
            if len(self._manifests) >= self.MAX_MANIFESTS:
                self._manifests.clear()
            self._manifests[notify.task.manifest_digest] = notify.manifest
        release = notify.task.release
        moment = pull_moment(self._pull_at.get(release), spread_ms=notify.pull_spread_ms, now=now, rng=self._rng)
        if moment is None:
            self._pull_at.pop(release, None)
        else:
            self._pull_at[release] = moment

    def manifest(self, digest: str) -> pb.GetManifestResponse | None:
        """The manifest a Notify carried for this digest (taken: an install uses it once)."""
        return self._manifests.pop(digest, None)

    def pull_delay(self, release: str, *, now: float) -> float:
        """Seconds until this release's pull may start (0 or less: now); asked once per Notify."""
        return self._pull_at.pop(release, now) - now

    def forget(self, release: str) -> None:
        """The release was revoked: no pull is owed."""
        self._pull_at.pop(release, None)

    @property
    def pending_pulls(self) -> dict[str, float]:
        return dict(self._pull_at)


def pull_moment(pending: float | None, *, spread_ms: int, now: float, rng: random.Random) -> float | None:
    """When to start the pull a Notify announces (`Notify.pull_spread_ms`), on the monotonic clock; None: at once.

    A uniformly random moment in the window. A moment already drawn for this
    release that comes sooner is kept: a run of changes does not push a
    device's pull back again and again. A Notify without a window drops it.
    """
    if spread_ms <= 0:
        return None
    moment = now + rng.uniform(0, spread_ms / 1000)
    if pending is not None and now < pending < moment:
        return pending
    return moment
