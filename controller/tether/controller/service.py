"""gRPC servicers: DeviceService (agents) and AdminService (operator, CLI).

Thin adapters. Each RPC authenticates, converts the request into domain
values (validated by the pure modules), calls the store / blob store / hub,
and converts back. Typed `TetherError`s become gRPC status codes here and
nowhere else (`_edge`); anything unexpected is logged and answered INTERNAL
without leaking internals.

Order matters in two places:
- Subscribe registers the stream in the hub *before* reading the desired
  state, so a release applied in between is either in the Sync or queued
  behind it (a duplicate Notify is harmless; a lost one is not).
- UploadResult enqueues aggregation only after the result's transaction
  committed, so a worker never looks for a row that is not there yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import psycopg_pool

from tether.common import auth, credentials, errors, manifest, signing
from tether.controller import admission, blobcache, blobs, device_auth, devices, hub, releases, rollouts, store, uploads
from tether.controller.enqueue import Enqueuer
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

BLOB_CHUNK_SIZE = 256 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_KEY_ID_LEN = 256
MAX_STATUS_MESSAGE = 4096
# A signed manifest up to this size rides in the Notify itself (`Notify.manifest`): one call less per device.
MAX_INLINE_MANIFEST_BYTES = 8 * 1024
# Pulls one device may have in progress at once (an agent makes one per release it installs).
MAX_PULLS_PER_DEVICE = 4
MAX_DIGESTS_PER_QUERY = manifest.MAX_FILES
_BRIDGE_TIMEOUT_S = 300.0  # a PutBlob client silent this long is abandoned

DELIVERY_STATES: dict[int, str] = {
    pb.DELIVERY_STATE_NOTIFIED: "notified",
    pb.DELIVERY_STATE_DOWNLOADING: "downloading",
    pb.DELIVERY_STATE_INSTALLED: "installed",
    pb.DELIVERY_STATE_RUNNING: "running",
    pb.DELIVERY_STATE_SUCCEEDED: "succeeded",
    pb.DELIVERY_STATE_FAILED: "failed",
    pb.DELIVERY_STATE_REFUSED: "refused",
    pb.DELIVERY_STATE_UNINSTALLED: "uninstalled",
}

R = TypeVar("R")


_overload_logged_at = -1e9


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, errors.TetherError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        await context.abort(code, str(exc), trailing_metadata=((auth.ERROR_TYPE_METADATA, type(exc).__name__),))
    if isinstance(exc, psycopg_pool.TooManyRequests | psycopg_pool.PoolTimeout):
        # Overload, not a bug: shed the request cheaply (no traceback per request); clients back off and retry.
        global _overload_logged_at
        if time.monotonic() - _overload_logged_at > 10:  # once per 10 s: a log line per request is load too
            _overload_logged_at = time.monotonic()
            log.warning("database pool saturated (%s): answering UNAVAILABLE", type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "controller busy; retry with backoff")
    log.exception("unexpected error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the controller log")


def _edge(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Map TetherError → status code for a unary-response RPC."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e)
            raise AssertionError("unreachable: abort raises") from e

    return wrapper


def _edge_stream(fn: Callable[..., AsyncGenerator[R, None]]) -> Callable[..., AsyncIterator[R]]:
    """Map TetherError → status code for a server-streaming RPC; always finalise the inner stream."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[R]:
        stream = fn(self, request, context)
        try:
            async for item in stream:
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e)
        finally:
            await stream.aclose()  # run its `finally` now, not whenever it is garbage-collected

    return wrapper


class ManifestCache:
    """Parsed manifests by digest. Content-addressed, hence immutable: caching is always correct."""

    def __init__(self, *, store_: store.Store, blob_store: blobs.BlobStore, size: int = 256) -> None:
        self._store = store_
        self._blobs = blob_store
        self._size = size
        self._items: collections.OrderedDict[str, tuple[store.StoredManifest, manifest.Manifest]] = (
            collections.OrderedDict()
        )

    async def get(self, digest: str) -> tuple[store.StoredManifest, manifest.Manifest]:
        hit = self._items.get(digest)
        if hit is not None:
            self._items.move_to_end(digest)
            return hit
        stored = await self._store.get_manifest(digest)
        if stored is None:
            raise errors.NotFound(f"manifest {digest} is not stored")
        item = (stored, manifest.Manifest.from_bytes(stored.body))
        self._items[digest] = item
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return item

    async def response(self, digest: str) -> pb.GetManifestResponse:
        """GetManifest's answer for a stored manifest: body, signature, and any direct blob URLs.

        A blob store that can serve blobs itself (object store, CDN) hands out URLs; the agent
        verifies each blob's digest either way and falls back to PullBlobs (docs/internals.md).
        """
        stored, parsed = await self.get(digest)
        urls = {d: url for d in parsed.blob_digests() if (url := self._blobs.url_for(d)) is not None}
        return pb.GetManifestResponse(
            manifest=stored.body, signature=stored.signature, key_id=stored.key_id, blob_urls=urls
        )

    async def inline(self, release: releases.Release | None) -> pb.GetManifestResponse | None:
        """The manifest answer to carry in this release's Notify, when it is small enough (`Notify.manifest`).

        Best effort: the push must go out whatever happens here (the devices then call GetManifest).
        Staged and paused releases never use it (per-cohort events; nothing pushed).
        """
        if release is None or release.deleted or release.paused or rollouts.staged(release):
            return None
        try:
            response = await self.response(release.manifest_digest)
        except errors.NotFound:
            return None  # the devices will ask GetManifest, which says so
        except Exception:
            log.warning("manifest of %s not inlined in its Notify", release.name, exc_info=True)
            return None
        return response if response.ByteSize() <= MAX_INLINE_MANIFEST_BYTES else None


async def _notify(
    *,
    hub_: hub.Hub,
    store_: store.Store,
    manifests: ManifestCache,
    before: releases.Release | None,
    after: releases.Release | None,
) -> None:
    """Push a release change to connected devices and record who was notified."""
    fan = hub_.release_changed(before=before, after=after, manifest=await manifests.inline(after))
    if after is not None and fan.notified:
        await store_.mark_notified(release=after.name, version=after.version, device_ids=fan.notified)
    if after is not None:
        for version, device_ids in fan.downgraded.items():  # a staged rollout sent them back to its stable version
            await store_.mark_notified(release=after.name, version=version, device_ids=device_ids, downgrade=True)
    subject = after if after is not None else before
    if subject is not None and (fan.notified or fan.revoked or fan.dropped):
        log.info(
            "release %s: notified %d, revoked %d, dropped %d slow device(s)",
            subject.name,
            len(fan.notified),
            len(fan.revoked),
            len(fan.dropped),
        )


def end_revoked_device(
    *,
    hub_: hub.Hub,
    authenticator: device_auth.DeviceAuthenticator | None,
    device_id: str,
    reason: str = "",
) -> bool:
    """A device was revoked (here, or on another replica): drop its cached authentication, end its stream.

    The same for the replica that revoked and for every other one (`replicas`); True when this process held a
    stream of the device. The stream ends with UNAUTHENTICATED, as every later call of the device does.
    """
    if authenticator is not None:
        authenticator.forget(device_id)
    return hub_.close_device(
        device_id, code=grpc.StatusCode.UNAUTHENTICATED, reason=reason or f"device {device_id} is revoked"
    )


async def end_revoked_streams(
    *, hub_: hub.Hub, store_: store.Store, authenticator: device_auth.DeviceAuthenticator | None
) -> tuple[str, ...]:
    """Revocations may have been missed (the LISTEN connection was down): start over from the registry.

    Every cached authentication is dropped, and the streams of connected devices that are now revoked (or
    gone) end: one query for all of them. Returns those device ids.
    """
    if authenticator is not None:
        authenticator.clear()
    gone = sorted(await store_.not_live(hub_.device_ids()))
    for device_id in gone:
        end_revoked_device(
            hub_=hub_,
            authenticator=authenticator,
            device_id=device_id,
            reason=f"device {device_id} is revoked or no longer enrolled",
        )
    if gone:
        log.warning("ended the streams of %d device(s) revoked while revocations went unheard", len(gone))
    return tuple(gone)


# ---------------------------------------------------------------- devices


class DeviceService(pb_grpc.DeviceServiceServicer):
    def __init__(
        self,
        *,
        store_: store.Store,
        blob_store: blobs.BlobStore,
        hub_: hub.Hub,
        enqueuer: Enqueuer,
        manifests: ManifestCache,
        bootstrap_token: str,
        heartbeat_s: float = 30.0,
        max_tensor_bytes: int = uploads.MAX_TENSOR_BYTES,
        clock: Callable[[], float] = time.time,
        authenticator: device_auth.DeviceAuthenticator | None = None,
        pull_gate: admission.FifoGate | None = None,
    ) -> None:
        self._store = store_
        self._blobs = blob_store
        self._pulls = pull_gate or admission.FifoGate()
        self._device_pulls: collections.Counter[str] = collections.Counter()
        self._chunk_cache = blobcache.ChunkCache(chunk_size=BLOB_CHUNK_SIZE)
        self._hub = hub_
        # Without one (tests that build the servicer directly): a key of this process only.
        self._auth = authenticator or device_auth.DeviceAuthenticator(
            store_=store_, signer=credentials.Signer([credentials.new_key()], clock=clock)
        )
        self._enqueuer = enqueuer
        self._manifests = manifests
        self._bootstrap_token = bootstrap_token
        self._heartbeat_s = heartbeat_s
        self._max_tensor_bytes = max_tensor_bytes
        self._clock = clock

    async def _device(self, context: grpc.aio.ServicerContext) -> devices.Device:
        """The calling device: signed, unexpired credential of a live device (`device_auth`)."""
        token = auth.bearer_token(context.invocation_metadata())
        return await self._auth.authenticate(token)

    @_edge
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        if not request.bootstrap_token or not auth.tokens_equal(request.bootstrap_token, self._bootstrap_token):
            raise errors.Unauthenticated("invalid bootstrap token")
        device_id = request.device.device_id or f"dev-{uuid.uuid4().hex}"
        auth.check_device_id(device_id)
        info = devices.validate_info(attributes=dict(request.device.attributes), backends=request.device.backends)
        credential = await self._store.enroll_device(device_id=device_id, info=info)
        token = self._auth.issue(credential)
        device = devices.Device(device_id=device_id, attributes=info.attributes, backends=info.backends)
        self._hub.update_facts(device_id=device_id, facts=device.facts)
        log.info("device %s enrolled", device_id)
        return pb.EnrollResponse(device_id=device_id, credential=str(token), expires_at=token.expires_at)

    @_edge
    async def RenewCredential(
        self, request: pb.RenewCredentialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewCredentialResponse:
        device = await self._device(context)
        token = self._auth.issue(await self._store.rotate_credential(device.device_id))
        log.info("device %s renewed its credential (expires %d)", device.device_id, token.expires_at)
        return pb.RenewCredentialResponse(credential=str(token), expires_at=token.expires_at)

    @_edge_stream
    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerEvent]:
        device = await self._device(context)
        conn = self._hub.connect(device_id=device.device_id, facts=device.facts)
        try:
            await self._store.touch_device(device.device_id)
            yield pb.ServerEvent(sync=await self._sync(device))
            while True:
                try:
                    item = await asyncio.wait_for(conn.queue.get(), timeout=self._heartbeat_s)
                except TimeoutError:
                    yield pb.ServerEvent(heartbeat=pb.Heartbeat(server_time_ms=int(self._clock() * 1000)))
                    continue
                if isinstance(item, hub.Closed):
                    await context.abort(item.code, item.reason)
                yield item
        finally:
            self._hub.disconnect(conn)

    @_edge
    async def GetDesired(self, request: pb.GetDesiredRequest, context: grpc.aio.ServicerContext) -> pb.Sync:
        """The Sync that opens Subscribe, as one call: for devices that poll instead of holding a stream."""
        return await self._sync(await self._device(context))

    async def _sync(self, device: devices.Device) -> pb.Sync:
        """This device's whole desired state, recorded as synced: what Subscribe opens with and GetDesired returns."""
        desired = await self._store.desired_tasks(device)
        await self._store.mark_synced(device_id=device.device_id, tasks=desired)
        return pb.Sync(
            desired=[
                hub.desired_task(
                    release=t.release,
                    version=t.version,
                    manifest_digest=t.manifest_digest,
                    trigger=t.trigger,
                    resources=t.resources,
                    rollback=t.rollback,
                )
                for t in desired
            ]
        )

    @_edge
    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestResponse:
        device = await self._device(context)
        release = await self._store.release_for_device(device, request.release)
        if request.manifest_digest != release.manifest_digest:
            raise errors.NotFound(
                f"release {release.name!r} is at manifest {release.manifest_digest}, not {request.manifest_digest!r}"
            )
        return await self._manifests.response(release.manifest_digest)

    @_edge_stream
    async def PullBlob(
        self, request: pb.PullBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        device = await self._device(context)
        digest = _digest(request.digest)
        release = await self._store.release_for_device(device, request.release)
        _, parsed = await self._manifests.get(release.manifest_digest)
        if digest not in parsed.blob_digests():
            raise errors.PermissionDenied(f"blob {digest} is not part of release {release.name!r}")
        if request.offset < 0:
            raise errors.InvalidArgument(f"offset: must be >= 0, got {request.offset}")
        total = await self._blob_size(digest)
        with self._device_pull(device.device_id):
            async with self._pulls.slot() as quantum:  # admission: see tether.controller.admission
                async for chunk in self._blob_chunks(digest, offset=request.offset, total=total, tag=""):
                    yield chunk
                    await quantum.sent(len(chunk.data))

    @_edge_stream
    async def PullBlobs(
        self, request: pb.PullBlobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        """Several blobs of one release in one stream: one authentication and one release lookup per call.

        The whole request is checked before the first chunk (docs/internals.md, "Pull"): a bad one
        sends nothing. Blobs follow in request order, each from its offset, each blob's chunks contiguous.
        """
        device = await self._device(context)
        wanted = _blob_ranges(request.blobs)  # shape first: a malformed request costs no database work
        release = await self._store.release_for_device(device, request.release)
        _, parsed = await self._manifests.get(release.manifest_digest)
        allowed = set(parsed.blob_digests())
        outside = [digest for digest, _ in wanted if digest not in allowed]
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            raise errors.PermissionDenied(f"blob {outside[0]} is not part of release {release.name!r}{more}")
        totals = []
        for i, (digest, offset) in enumerate(wanted):
            total = await self._blob_size(digest)
            if offset > total:
                raise errors.InvalidArgument(f"blobs[{i}].offset: {offset} is beyond blob {digest} of {total} bytes")
            totals.append(total)
        # Admission (tether.controller.admission): a fleet told at once pulls in arrival order, a few at a time.
        with self._device_pull(device.device_id):
            async with self._pulls.slot() as quantum:
                for (digest, offset), total in zip(wanted, totals, strict=True):
                    async for chunk in self._blob_chunks(digest, offset=offset, total=total, tag=digest):
                        yield chunk
                        await quantum.sent(len(chunk.data))

    @contextlib.contextmanager
    def _device_pull(self, device_id: str) -> Iterator[None]:
        """At most MAX_PULLS_PER_DEVICE pulls of one device at a time: none can take the gate's slots for itself."""
        if self._device_pulls[device_id] >= MAX_PULLS_PER_DEVICE:
            raise errors.Busy(
                f"device {device_id} already has {MAX_PULLS_PER_DEVICE} pulls in progress; retry when one ends"
            )
        self._device_pulls[device_id] += 1
        try:
            yield
        finally:
            self._device_pulls[device_id] -= 1
            if not self._device_pulls[device_id]:
                del self._device_pulls[device_id]

    async def _blob_size(self, digest: str) -> int:
        total = await self._chunk_cache.size(self._blobs, digest)
        if total is None:
            raise errors.NotFound(f"blob {digest} is not stored")
        return total

    async def _blob_chunks(self, digest: str, *, offset: int, total: int, tag: str) -> AsyncIterator[pb.BlobChunk]:
        """One blob from `offset` as BlobChunks (`digest` = `tag`); at least one, empty when resumed at its end."""
        # Chunks come from a bounded in-memory cache (every device of a rollout pulls the same blobs).
        position = offset
        sent = False
        async for chunk in self._chunk_cache.chunks(self._blobs, digest, offset=offset, total=total):
            yield pb.BlobChunk(offset=position, data=chunk, total_size=total, digest=tag)
            position += len(chunk)
            sent = True
        if not sent:  # resumed at the very end: still tell the agent the size
            yield pb.BlobChunk(offset=position, data=b"", total_size=total, digest=tag)

    @_edge
    async def ReportStatus(
        self, request: pb.ReportStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportStatusResponse:
        device = await self._device(context)
        state = DELIVERY_STATES.get(request.state)
        if state is None:
            raise errors.InvalidArgument(f"state: {request.state} is not a reportable delivery state")
        if "\x00" in request.message or any("\x00" in k or "\x00" in v for k, v in request.device_state.items()):
            raise errors.InvalidArgument("message and device_state must not contain NUL characters")
        await self._store.report_delivery(
            device=device,
            release=request.release,
            version=request.version,
            state=state,
            message=request.message[:MAX_STATUS_MESSAGE],
            device_state=dict(request.device_state),
        )
        return pb.ReportStatusResponse()

    @_edge
    async def ReportBackends(
        self, request: pb.ReportBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportBackendsResponse:
        """The device's backend selection results: stored on it, and its targeting facts follow."""
        device = await self._device(context)
        choices = devices.validate_choices(
            {
                "model_key": c.model_key,
                "candidate": c.candidate,
                "latency_ms": c.latency_ms,
                "release": c.release,
                "model": c.model,
            }
            for c in request.choices
        )
        info = devices.validate_info(attributes=device.attributes, backends=request.backends or device.backends)
        await self._store.set_backend_choices(
            device_id=device.device_id, choices=choices, fingerprint=request.fingerprint, backends=info.backends
        )
        updated = dataclasses.replace(device, backends=info.backends, backend_choices=choices)
        self._hub.update_facts(device_id=device.device_id, facts=updated.facts)
        self._auth.forget(device.device_id)  # its cached entry holds the old facts: read them again next call
        return pb.ReportBackendsResponse()

    @_edge
    async def UploadResult(
        self, request: pb.UploadResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadResultResponse:
        device = await self._device(context)
        record = uploads.validate_result(
            release=request.release,
            version=request.version,
            idempotency_key=request.idempotency_key,
            sample_count=request.sample_count,
            metrics=dict(request.metrics),
            counts=dict(request.counts),
            tensors=[uploads.TensorIn(name=t.name, shape=list(t.shape), data=t.data) for t in request.tensors],
            duration_s=request.duration_s,
            max_tensor_bytes=self._max_tensor_bytes,
        )
        outcome = await self._store.insert_result(device=device, record=record)
        # Committed. A duplicate enqueues too: if the first attempt's publish failed, the retry heals it.
        await self._enqueuer.enqueue(release=outcome.release, version=outcome.version)
        return pb.UploadResultResponse(duplicate=outcome.duplicate)


# ---------------------------------------------------------------- admin


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        *,
        store_: store.Store,
        blob_store: blobs.BlobStore,
        hub_: hub.Hub,
        admin_token: str,
        authenticator: device_auth.DeviceAuthenticator | None = None,
        bundle_policy: signing.BundlePolicy | None = None,
        manifests: ManifestCache | None = None,
    ) -> None:
        self._store = store_
        self._blobs = blob_store
        self._manifests = manifests or ManifestCache(store_=store_, blob_store=blob_store)
        self._hub = hub_
        self._admin_token = admin_token
        self._auth = authenticator
        self._bundle_policy = bundle_policy or signing.BundlePolicy()

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        token = auth.bearer_token(context.invocation_metadata())
        if not auth.tokens_equal(token, self._admin_token):
            raise errors.Unauthenticated("invalid admin token")

    @_edge
    async def MissingBlobs(
        self, request: pb.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MissingBlobsResponse:
        self._admin(context)
        if len(request.digests) > MAX_DIGESTS_PER_QUERY:
            raise errors.TooLarge(f"digests: {len(request.digests)} entries; the limit is {MAX_DIGESTS_PER_QUERY}")
        wanted = [_digest(d) for d in dict.fromkeys(request.digests)]
        recorded = await self._store.blob_sizes(wanted)
        missing = []
        for d in wanted:
            if d not in recorded or not await asyncio.to_thread(self._blobs.has, d):
                missing.append(d)
        return pb.MissingBlobsResponse(missing=missing)

    @_edge
    async def PutBlob(
        self, request_iterator: AsyncIterator[pb.PutBlobChunk], context: grpc.aio.ServicerContext
    ) -> pb.PutBlobResponse:
        try:
            self._admin(context)
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise errors.InvalidArgument("PutBlob stream is empty: the first message must carry the digest")
            digest = _digest(first.digest)

            async def chunks() -> AsyncIterator[bytes]:
                yield first.data
                async for message in request_iterator:
                    if message.digest and message.digest != digest:
                        raise errors.InvalidArgument(f"digest changed mid-stream from {digest} to {message.digest}")
                    yield message.data

            loop = asyncio.get_running_loop()
            size = await asyncio.to_thread(self._blobs.put_stream, digest, _blocking_iter(chunks(), loop))
        except errors.TetherError:
            await _drain(request_iterator)
            raise
        await self._store.put_blob(digest=digest, size=size)
        log.info("stored blob %s (%d bytes)", digest, size)
        return pb.PutBlobResponse(digest=digest, size=size)

    @_edge
    async def PutManifest(
        self, request: pb.PutManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutManifestResponse:
        self._admin(context)
        if len(request.signature) > MAX_SIGNATURE_BYTES:
            raise errors.InvalidArgument(f"signature: longer than {MAX_SIGNATURE_BYTES} bytes")
        if len(request.key_id) > MAX_KEY_ID_LEN:
            raise errors.InvalidArgument(f"key_id: longer than {MAX_KEY_ID_LEN} characters")
        if request.signature and not request.key_id:
            raise errors.InvalidArgument("key_id: required when a signature is given")
        self._bundle_policy.check(request.manifest, signature=request.signature, key_id_=request.key_id)
        digest = await self._store.put_manifest(
            body=request.manifest, signature=request.signature, key_id=request.key_id
        )
        return pb.PutManifestResponse(digest=digest)

    @_edge
    async def ApplyRelease(
        self, request: pb.ApplyReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyReleaseResponse:
        self._admin(context)
        spec = releases.spec_from_proto(request.spec)
        outcome = await self._store.apply_release(spec)
        previous = outcome.previous
        if (
            outcome.changed
            or (previous is not None and previous.paused != outcome.release.paused)
            or rollouts.serving_changed(previous, outcome.release)
        ):
            await _notify(
                hub_=self._hub, store_=self._store, manifests=self._manifests, before=previous, after=outcome.release
            )
        return pb.ApplyReleaseResponse(
            release=outcome.release.name, version=outcome.release.version, changed=outcome.changed
        )

    @_edge
    async def DeleteRelease(
        self, request: pb.DeleteReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteReleaseResponse:
        self._admin(context)
        releases.check_release_name(request.release)
        previous = await self._store.delete_release(request.release)
        if previous is not None:
            await _notify(hub_=self._hub, store_=self._store, manifests=self._manifests, before=previous, after=None)
        return pb.DeleteReleaseResponse(deleted=previous is not None)

    @_edge
    async def GetReleaseStatus(
        self, request: pb.GetReleaseStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseStatus:
        self._admin(context)
        releases.check_release_name(request.release)
        [counts] = await self._store.release_counts([request.release])
        return self._status(counts)

    @_edge
    async def ListReleases(
        self, request: pb.ListReleasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReleasesResponse:
        self._admin(context)
        counts = await self._store.release_counts()
        return pb.ListReleasesResponse(releases=[self._status(c) for c in counts])

    @_edge
    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeDeviceResponse:
        self._admin(context)
        device_id = auth.check_device_id(request.device_id)
        # Committed: the database announces it to every replica (`replicas`), which do the same as here.
        revoked = await self._store.revoke_device(device_id)
        disconnected = end_revoked_device(hub_=self._hub, authenticator=self._auth, device_id=device_id)
        log.warning("device %s revoked%s", device_id, " (stream ended)" if disconnected else "")
        return pb.RevokeDeviceResponse(revoked=revoked, disconnected=disconnected)

    @_edge
    async def TriggerRun(
        self, request: pb.TriggerRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TriggerRunResponse:
        """On-demand trigger: a RunNow to every connected device the release targets."""
        self._admin(context)
        releases.check_release_name(request.release)
        releases.parse_payload(request.payload_json)
        request_id = releases.check_request_id(request.request_id) or uuid.uuid4().hex
        release = await self._store.get_release(request.release)
        if release is None:
            raise errors.NotFound(f"release {request.release!r} does not exist")
        if release.paused:
            raise errors.FailedPrecondition(f"release {request.release!r} is paused")
        run = pb.RunNow(
            release=release.name, version=release.version, request_id=request_id, payload_json=request.payload_json
        )
        devices_ = self._hub.run_now(release, run)
        log.info("run %s requested on %d devices (request %s)", release.name, len(devices_), request_id)
        return pb.TriggerRunResponse(request_id=request_id, version=release.version, devices=len(devices_))

    def _status(self, counts: store.ReleaseCounts) -> pb.ReleaseStatus:
        connected = self._hub.connected_targeted(counts.subject)
        return pb.ReleaseStatus(
            release=counts.release,
            version=counts.version,
            manifest_digest=counts.manifest_digest,
            targeted=counts.targeted,
            notified=counts.notified,
            installed=counts.installed,
            succeeded=counts.succeeded,
            failed=counts.failed,
            refused=counts.refused,
            results=counts.results,
            aggregate_json=counts.aggregate_json,
            aggregate_round=counts.aggregate_round,
            connected_devices=connected,
            health_json=counts.health_json,
        )


# ---------------------------------------------------------------- helpers


def _digest(value: str) -> str:
    try:
        return manifest.check_digest(value)
    except errors.InvalidManifest as e:
        raise errors.InvalidArgument(str(e)) from None


def _blob_ranges(ranges: Sequence[pb.BlobRange]) -> list[tuple[str, int]]:
    """A PullBlobs request's (digest, offset) pairs, in order: bounded, well-formed, distinct, non-negative."""
    if not ranges:
        raise errors.InvalidArgument("blobs: name at least one blob")
    if len(ranges) > manifest.MAX_BLOBS_PER_PULL:
        raise errors.InvalidArgument(
            f"blobs: {len(ranges)} named, at most {manifest.MAX_BLOBS_PER_PULL} per call (split into several)"
        )
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, r in enumerate(ranges):
        try:  # (a digest can only be 71 characters: an error message need not quote more)
            digest = manifest.check_digest(r.digest[:80], field=f"blobs[{i}].digest")
        except errors.InvalidManifest as e:
            raise errors.InvalidArgument(str(e)) from None
        if digest in seen:
            raise errors.InvalidArgument(f"blobs[{i}].digest: {digest} is named twice")
        if r.offset < 0:
            raise errors.InvalidArgument(f"blobs[{i}].offset: must be >= 0, got {r.offset}")
        seen.add(digest)
        out.append((digest, r.offset))
    return out


async def _drain(messages: AsyncIterator[Any], *, max_bytes: int = 64 * 1024 * 1024, max_s: float = 5.0) -> None:
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
                total += len(getattr(message, "data", b""))
                if total > max_bytes:
                    return


def _blocking_iter(chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """Drive an async iterator from a worker thread (the blob store's writes are blocking)."""
    while True:
        future = asyncio.run_coroutine_threadsafe(_next_or_end(chunks), loop)
        item = future.result(timeout=_BRIDGE_TIMEOUT_S)
        if item is None:
            return
        yield item


async def _next_or_end(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)
