"""DeviceService: the agents' RPCs, thin over storage, the hub and the pure decisions.

Authentication and error mapping are the edge's (`tether.controller.edge`):
every method here finds its caller in `edge.current_device()` and raises
typed errors. Request bounds are `wire`'s; who may read what is `serving`'s
(through `release_cache`).

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
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import grpc

from tether.common import auth, errors, tracing
from tether.controller import (
    admission,
    blobcache,
    blobstores,
    deliveries,
    delivery_reports,
    device_auth,
    devices,
    edge,
    fanout,
    hub,
    ingress,
    instruments,
    release_cache,
    round_updates,
    serving,
    uploads,
)
from tether.controller.enqueue import Enqueuer
from tether.controller.fl import intake
from tether.controller.storage import contracts
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

BLOB_CHUNK_SIZE = 256 * 1024
# Pulls one device may have in progress at once (an agent makes one per release it installs).
MAX_PULLS_PER_DEVICE = 4


class DeviceService(pb_grpc.DeviceServiceServicer):
    def __init__(
        self,
        *,
        storage: contracts.Storage,
        releases: release_cache.ReleaseCache,
        reporter: delivery_reports.DeliveryReporter,
        blob_store: blobstores.BlobBackend,
        hub_: hub.Hub,
        enqueuer: Enqueuer,
        manifests: fanout.ManifestCache,
        authenticator: device_auth.DeviceAuthenticator,
        bootstrap_token: str,
        heartbeat_s: float = 30.0,
        max_tensor_bytes: int = uploads.MAX_TENSOR_BYTES,
        clock: Callable[[], float] = time.time,
        pull_gate: admission.FifoGate | None = None,
        metrics: instruments.ControllerMetrics | None = None,
        replica_id: str = "",
        round_intake: round_updates.UpdateIntake | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else instruments.ControllerMetrics()
        self._replica_id = replica_id  # recorded as a device's connected replica ("": not recorded)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._storage = storage
        self.releases = releases
        self._reporter = reporter
        self._blobs = blob_store
        self._pulls = pull_gate or admission.FifoGate()
        self._device_pulls: collections.Counter[str] = collections.Counter()
        self._chunk_cache = blobcache.ChunkCache(chunk_size=BLOB_CHUNK_SIZE)
        self._hub = hub_
        self._auth = authenticator
        self._enqueuer = enqueuer
        self._manifests = manifests
        self._bootstrap_token = bootstrap_token
        self._heartbeat_s = heartbeat_s
        self._max_tensor_bytes = max_tensor_bytes
        self._clock = clock
        self.round_intake = round_intake or round_updates.UpdateIntake(
            storage=storage, blob_store=blob_store, clock=clock
        )

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        if not request.bootstrap_token or not auth.tokens_equal(request.bootstrap_token, self._bootstrap_token):
            raise errors.Unauthenticated("invalid bootstrap token")
        device_id = request.device.device_id or f"dev-{uuid.uuid4().hex}"
        auth.check_device_id(device_id)
        info = devices.validate_info(attributes=dict(request.device.attributes), backends=request.device.backends)
        credential = await self._storage.devices.enroll_device(device_id=device_id, info=info)
        token = self._auth.issue(credential)
        device = devices.Device(device_id=device_id, attributes=info.attributes, backends=info.backends)
        self._hub.update_facts(device_id=device_id, facts=device.facts)
        log.info("device %s enrolled", device_id)
        return pb.EnrollResponse(device_id=device_id, credential=str(token), expires_at=token.expires_at)

    async def RenewCredential(
        self, request: pb.RenewCredentialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewCredentialResponse:
        device = edge.current_device()
        token = self._auth.issue(await self._storage.devices.rotate_credential(device.device_id))
        log.info("device %s renewed its credential (expires %d)", device.device_id, token.expires_at)
        return pb.RenewCredentialResponse(credential=str(token), expires_at=token.expires_at)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerEvent]:
        device = edge.current_device()
        conn = self._hub.connect(device_id=device.device_id, facts=device.facts)
        try:
            if self._replica_id:
                await self._storage.devices.device_connected(device.device_id, self._replica_id)
            else:
                await self._storage.devices.touch_device(device.device_id)
            yield pb.ServerEvent(sync=await self._sync(device, installed=request.installed))
            while True:
                try:
                    item = await asyncio.wait_for(conn.queue.get(), timeout=self._heartbeat_s)
                except TimeoutError:
                    yield pb.ServerEvent(heartbeat=pb.Heartbeat(server_time_ms=int(self._clock() * 1000)))
                    continue
                if isinstance(item, hub.Closed):
                    await context.abort(item.code, errors.bounded(item.reason))
                    return  # abort raised
                yield item
        finally:
            self._hub.disconnect(conn)
            if self._replica_id:
                self._forget_connection(device.device_id)

    def _forget_connection(self, device_id: str) -> None:
        """Clear the device's connected replica, in a task of its own: a cancelled stream's cleanup may not await."""

        async def clear() -> None:
            try:
                await self._storage.devices.device_disconnected(device_id, self._replica_id)
            except Exception as e:
                log.warning("could not record that device %s disconnected: %s", device_id, e)

        task = asyncio.get_running_loop().create_task(clear())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def GetDesired(self, request: pb.GetDesiredRequest, context: grpc.aio.ServicerContext) -> pb.Sync:
        """The Sync that opens Subscribe, as one call: for devices that poll instead of holding a stream."""
        return await self._sync(edge.current_device())

    async def _sync(self, device: devices.Device, *, installed: Sequence[pb.DesiredTask] = ()) -> pb.Sync:
        """This device's whole desired state, recorded as synced: what Subscribe opens with and GetDesired returns.

        `installed` (Subscribe's): what the device holds. A served version it holds settles its
        delivery (`deliveries.confirmed_installs`), so an `installed` report lost in a disconnect
        is made good by the next connection.
        """
        ledger = self._storage.releases
        desired = await ledger.desired_tasks(device)
        await ledger.mark_synced(device_id=device.device_id, tasks=desired)
        confirmed = deliveries.confirmed_installs(
            [(t.release, t.version, t.manifest_digest) for t in installed[: ingress.MAX_INSTALLED]],
            [(t.release, t.version, t.manifest_digest) for t in desired],
        )
        if confirmed:
            await ledger.confirm_installed(device_id=device.device_id, installs=confirmed)
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

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestResponse:
        device = edge.current_device()
        release = await self.releases.release_for_device(device, request.release)
        if request.manifest_digest != release.manifest_digest:
            raise errors.NotFound(
                f"release {release.name!r} is at manifest {release.manifest_digest}, not {request.manifest_digest!r}"
            )
        return await self._manifests.response(release.manifest_digest, device_id=device.device_id)

    async def PullBlob(
        self, request: pb.PullBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        device = edge.current_device()
        digest = ingress.digest(request.digest)
        release = await self.releases.release_for_device(device, request.release)
        _, parsed = await self._manifests.get(release.manifest_digest)
        if serving.blobs_outside(parsed.blob_digests(), [digest]):
            raise errors.PermissionDenied(f"blob {digest} is not part of release {release.name!r}")
        offset = ingress.offset(request.offset)
        total = await self._blob_size(digest)
        with self._device_pull(device.device_id):
            async with self._pulls.slot() as quantum:  # admission: see tether.controller.admission
                self._metrics.pulls_blob.inc()
                served = self._metrics.bytes_served
                async for chunk in self._blob_chunks(digest, offset=offset, total=total, tag=""):
                    yield chunk
                    served.inc(len(chunk.data))
                    await quantum.sent(len(chunk.data))

    async def PullBlobs(
        self, request: pb.PullBlobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        """Several blobs of one release in one stream: one authentication and one release lookup per call.

        The whole request is checked before the first chunk (docs/internals.md, "Pull"): a bad one
        sends nothing. Blobs follow in request order, each from its offset, each blob's chunks contiguous.
        """
        device = edge.current_device()
        wanted = ingress.blob_ranges(request.blobs)  # shape first: a malformed request costs no database work
        release = await self.releases.release_for_device(device, request.release)
        _, parsed = await self._manifests.get(release.manifest_digest)
        outside = serving.blobs_outside(parsed.blob_digests(), [digest for digest, _ in wanted])
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
                self._metrics.pulls_blobs.inc()
                served = self._metrics.bytes_served
                for (digest, offset), total in zip(wanted, totals, strict=True):
                    async for chunk in self._blob_chunks(digest, offset=offset, total=total, tag=digest):
                        yield chunk
                        served.inc(len(chunk.data))
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

    async def ReportStatus(
        self, request: pb.ReportStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportStatusResponse:
        device = edge.current_device()
        state = ingress.delivery_state(request)
        failures = ingress.reported_url_failures(request)  # checked before anything is written
        await self._reporter.report_delivery(
            device=device,
            release=request.release,
            version=request.version,
            state=state,
            message=request.message[: ingress.MAX_STATUS_MESSAGE],
            device_state=dict(request.device_state),
        )
        self._metrics.report(state)  # committed (installs by outcome)
        if failures:  # URLs that did not deliver: the device fell back to PullBlobs
            self._metrics.url_failed(failures)
            log.warning(
                "device %s: blob URLs of %s failed (%s); it pulled over gRPC instead",
                device.device_id,
                request.release,
                ", ".join(f"{reason} x{n}" for reason, n in failures.items()),
            )
        return pb.ReportStatusResponse()

    async def ReportBackends(
        self, request: pb.ReportBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportBackendsResponse:
        """The device's backend selection results: stored on it, and its targeting facts follow."""
        device = edge.current_device()
        choices = ingress.backend_choices(request)
        fingerprint = devices.validate_fingerprint(request.fingerprint)
        info = devices.validate_info(attributes=device.attributes, backends=request.backends or device.backends)
        await self._storage.devices.set_backend_choices(
            device_id=device.device_id, choices=choices, fingerprint=fingerprint, backends=info.backends
        )
        updated = dataclasses.replace(device, backends=info.backends, backend_choices=choices)
        self._hub.update_facts(device_id=device.device_id, facts=updated.facts)
        self._auth.forget(device.device_id)  # its cached entry holds the old facts: read them again next call
        return pb.ReportBackendsResponse()

    async def UploadResult(
        self, request: pb.UploadResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadResultResponse:
        device = edge.current_device()
        record = ingress.result(request, max_tensor_bytes=self._max_tensor_bytes)
        parent = tracing.extract(context.invocation_metadata(), via="grpc-server") if tracing.active() else None
        with tracing.span("UploadResult", parent=parent, release=request.release, device=device.device_id):
            outcome = await self._storage.results.insert_result(device=device, record=record)
            # Committed. A duplicate enqueues too: if the first attempt's publish failed, the retry heals it.
            await self._enqueuer.enqueue(release=outcome.release, version=outcome.version)
        if not outcome.duplicate:
            self._metrics.results.inc()
        return pb.UploadResultResponse(duplicate=outcome.duplicate)

    async def PushUpdate(
        self, request_iterator: AsyncIterator[pb.PushUpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.PushUpdateResponse:
        device = edge.current_device()
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or not first.HasField("header"):
                raise errors.InvalidArgument("header: the first PushUpdate message must carry the update's header")
            h = first.header
            header = intake.parse_header(
                release=h.release,
                round_number=h.round,
                version=h.version,
                sample_count=h.sample_count,
                metrics=dict(h.metrics),
                encoding=h.encoding,
                size=h.size,
                digest=h.sha256,
                max_bytes=self.round_intake.max_update_bytes,
            )

            async def chunks() -> AsyncIterator[bytes]:
                yield first.data
                async for message in request_iterator:
                    if message.HasField("header"):
                        raise errors.InvalidArgument("header: only the first message may carry a header")
                    yield message.data

            verdict, digest = await self.round_intake.push(device=device, header=header, chunks=chunks())
        except errors.TetherError:
            await edge.drain(request_iterator)
            raise
        refusal = "" if verdict.refusal is None else verdict.refusal.value
        return pb.PushUpdateResponse(accepted=verdict.accepted, refusal=refusal, message=verdict.message, digest=digest)
