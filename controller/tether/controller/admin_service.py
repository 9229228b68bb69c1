"""AdminService: the operator's and the CLI's RPCs, thin over storage, the blob store and the fan-out.

The admin token and error mapping are the edge's (`tether.controller.edge`);
request bounds are `wire`'s; what connected devices hear after a change is
`fanout`'s. Release writes go through `release_cache`, which forgets what it
kept about a release the moment it changes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from tether.common import auth, errors, signing, tracing
from tether.controller import (
    blobstores,
    deliveries,
    devices,
    edge,
    fanout,
    hub,
    ingress,
    release_cache,
    releases,
    rollouts,
    round_driver,
)
from tether.controller.fl import status as fl_status
from tether.controller.storage import contracts
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

EXPORT_CHUNK = 1024 * 1024


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        *,
        storage: contracts.Storage,
        releases_: release_cache.ReleaseCache,
        blob_store: blobstores.BlobBackend,
        hub_: hub.Hub,
        fan_out: fanout.FanOut,
        bundle_policy: signing.BundlePolicy | None = None,
        rounds: round_driver.RoundDriver | None = None,
    ) -> None:
        self._rounds = rounds
        self._storage = storage
        self._releases = releases_
        self._blobs = blob_store
        self._hub = hub_
        self._fan_out = fan_out
        self._bundle_policy = bundle_policy or signing.BundlePolicy()

    async def MissingBlobs(
        self, request: pb.MissingBlobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.MissingBlobsResponse:
        wanted = ingress.queried_digests(request)
        recorded = await self._storage.bundles.blob_sizes(wanted)
        missing = []
        for d in wanted:
            if d not in recorded or not await self._blobs.has(d):
                missing.append(d)
        return pb.MissingBlobsResponse(missing=missing)

    async def PutBlob(
        self, request_iterator: AsyncIterator[pb.PutBlobChunk], context: grpc.aio.ServicerContext
    ) -> pb.PutBlobResponse:
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise errors.InvalidArgument("PutBlob stream is empty: the first message must carry the digest")
            digest = ingress.digest(first.digest)

            async def chunks() -> AsyncIterator[bytes]:
                yield first.data
                async for message in request_iterator:
                    if message.digest and message.digest != digest:
                        raise errors.InvalidArgument(f"digest changed mid-stream from {digest} to {message.digest}")
                    yield message.data

            size = await self._blobs.put_stream(digest, chunks())
        except errors.TetherError:
            await edge.drain(request_iterator)
            raise
        await self._storage.bundles.put_blob(digest=digest, size=size)
        log.info("stored blob %s (%d bytes)", digest, size)
        return pb.PutBlobResponse(digest=digest, size=size)

    async def PutManifest(
        self, request: pb.PutManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutManifestResponse:
        ingress.manifest_signature(request)
        self._bundle_policy.check(request.manifest, signature=request.signature, key_id_=request.key_id)
        digest = await self._storage.bundles.put_manifest(
            body=request.manifest, signature=request.signature, key_id=request.key_id
        )
        return pb.PutManifestResponse(digest=digest)

    async def ApplyRelease(
        self, request: pb.ApplyReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyReleaseResponse:
        spec = releases.spec_from_proto(request.spec)
        parent = tracing.extract(context.invocation_metadata(), via="grpc-server") if tracing.active() else None
        with tracing.span("ApplyRelease", parent=parent, release=spec.release):
            outcome = await self._releases.apply_release(spec)
            previous = outcome.previous
            if (
                outcome.changed
                or (previous is not None and previous.paused != outcome.release.paused)
                or rollouts.serving_changed(previous, outcome.release)
            ):
                await self._fan_out.release_changed(previous, outcome.release)
        return pb.ApplyReleaseResponse(
            release=outcome.release.name, version=outcome.release.version, changed=outcome.changed
        )

    async def DeleteRelease(
        self, request: pb.DeleteReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteReleaseResponse:
        releases.check_release_name(request.release)
        previous = await self._releases.delete_release(request.release)
        if previous is not None:
            await self._fan_out.release_changed(previous, None)
        return pb.DeleteReleaseResponse(deleted=previous is not None)

    async def GetReleaseStatus(
        self, request: pb.GetReleaseStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseStatus:
        releases.check_release_name(request.release)
        requested = request.report_deadline_seconds if request.HasField("report_deadline_seconds") else None
        deadline = deliveries.check_report_deadline(requested)
        [counts] = await self._storage.releases.release_counts([request.release], report_deadline_s=deadline)
        status = self._status(counts)
        status.federated_json = await self._federated(request.release)
        return status

    async def ExportRoundModel(
        self, request: pb.RoundModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        releases.check_release_name(request.release)
        if request.round < 0:
            raise errors.InvalidArgument(f"round: must be at least 0, got {request.round}")
        digest, size = await self._driver().model_of(request.release, request.round)
        at = 0
        while at < size or at == 0:
            data = await self._blobs.read(digest, offset=at, length=min(EXPORT_CHUNK, size - at)) if size else b""
            yield pb.BlobChunk(offset=at, data=data, total_size=size, digest=digest)
            if not data:
                break
            at += len(data)

    async def RollbackRound(
        self, request: pb.RoundModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackRoundResponse:
        releases.check_release_name(request.release)
        if request.round < 0:
            raise errors.InvalidArgument(f"round: must be at least 0, got {request.round}")
        served, model, cancelled = await self._driver().rollback(request.release, request.round)
        return pb.RollbackRoundResponse(
            release=served.name, version=served.version, model=model, cancelled_round=cancelled
        )

    def _driver(self) -> round_driver.RoundDriver:
        if self._rounds is None:
            raise errors.FailedPrecondition("this controller runs no federated rounds")
        return self._rounds

    async def _federated(self, release: str) -> str:
        """The release's rounds (`fl.status`), "" when it is not federated or has run none."""
        rel = await self._storage.releases.get_release(release)
        if rel is None or not rel.spec.federated:
            return ""
        history = await self._storage.rounds.rounds_of(task=release)
        results = {}
        for r in history:
            res = await self._storage.rounds.round_result(task=release, number=r.number)
            if res is not None:
                results[r.number] = res
        doc = fl_status.document(history, results, rules=rel.spec.rules())
        return json.dumps(doc, sort_keys=True) if doc else ""

    async def ListReleases(
        self, request: pb.ListReleasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReleasesResponse:
        counts = await self._storage.releases.release_counts()
        return pb.ListReleasesResponse(releases=[self._status(c) for c in counts])

    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeDeviceResponse:
        device_id = auth.check_device_id(request.device_id)
        # Asked before the revocation commits: this replica's own listener may hear the announcement and end
        # the stream before the line after the commit runs (a race that made `disconnected` flaky).
        held = self._hub.is_connected(device_id)
        # Committed: the database announces it to every replica (`replicas`), which do the same as here.
        revoked = await self._storage.devices.revoke_device(device_id)
        disconnected = self._fan_out.device_revoked(device_id) or (revoked and held)
        log.warning("device %s revoked%s", device_id, " (stream ended)" if disconnected else "")
        return pb.RevokeDeviceResponse(revoked=revoked, disconnected=disconnected)

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        if not 0 <= request.page_size <= devices.MAX_PAGE:
            raise errors.InvalidArgument(f"page_size: must be 0 (100) to {devices.MAX_PAGE}")
        if request.page_token:
            auth.check_device_id(request.page_token)  # a device id: where the previous page ended
        size = request.page_size or 100
        # One more than a page: whether another page follows, without a count of the fleet.
        entries = await self._storage.devices.list_devices(
            after=request.page_token, limit=size + 1, include_revoked=request.include_revoked
        )
        page = entries[:size]
        return pb.ListDevicesResponse(
            devices=[_summary(e) for e in page],
            next_page_token=page[-1].device.device_id if len(entries) > size else "",
        )

    async def TriggerRun(
        self, request: pb.TriggerRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TriggerRunResponse:
        """On-demand trigger: a RunNow to every connected device the release targets."""
        releases.check_release_name(request.release)
        releases.parse_payload(request.payload_json)
        request_id = releases.check_request_id(request.request_id) or uuid.uuid4().hex
        release = await self._releases.get_release(request.release)
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

    def _status(self, counts: deliveries.ReleaseCounts) -> pb.ReleaseStatus:
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
            not_reporting=counts.not_reporting,
            report_deadline_seconds=counts.report_deadline_s,
        )


def _summary(entry: devices.InventoryEntry) -> pb.DeviceSummary:
    d = entry.device
    return pb.DeviceSummary(
        device_id=d.device_id,
        attributes=dict(d.attributes),
        backends=list(d.backends),
        selected_backends=[f"{c.release}/{c.model}={c.candidate}" for c in d.backend_choices],
        last_seen_unix=entry.last_seen or 0.0,
        revoked=d.revoked,
        releases=[pb.DeviceRelease(release=r.release, version=r.version, state=r.state) for r in entry.releases],
        device_state=dict(entry.device_state),
        connected_replica=entry.connected_replica,
    )
