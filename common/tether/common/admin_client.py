"""Async client of the controller's AdminService (operator, `tether bundle`, `tether status`, tests).

Every call carries the admin token; every gRPC failure comes back as the
`TetherError` subclass the controller raised (it names the class in the
`tether-error` trailing metadata; otherwise the status code decides), so
callers handle `errors.FailedPrecondition`, never `grpc.aio.AioRpcError`.

`upload_bundle` is content-addressed end to end: it asks which blobs the
controller lacks, streams only those (the controller re-hashes every byte),
then stores the manifest, whose digest is returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

import grpc

from tether.common import auth, config, errors, manifest, tracing
from tether.common import tls as tls_mod
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.spec import resources as spec_resources
from tether.spec import selectors, staging, wire

DEFAULT_CHUNK_SIZE = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 20 * 1024 * 1024


class Unavailable(errors.TetherError):
    """The controller could not be reached or did not answer in time; retrying is safe."""

    code = "UNAVAILABLE"


_BY_CODE: dict[grpc.StatusCode, type[errors.TetherError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.TooLarge,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def error_from_rpc(e: grpc.aio.AioRpcError) -> errors.TetherError:
    """The typed error a failed call stands for."""
    details = e.details() or e.code().name
    for key, value in e.trailing_metadata() or ():
        if key == auth.ERROR_TYPE_METADATA:
            cls = getattr(errors, str(value), None)
            if isinstance(cls, type) and issubclass(cls, errors.TetherError):
                return cls(details)  # the message is already formatted server-side
    cls = _BY_CODE.get(e.code(), errors.TetherError)
    return cls(f"{e.code().name}: {details}")


class BundleUpload(NamedTuple):
    """What `upload_bundle` did; unpacks as (digest, uploaded_count, uploaded_bytes)."""

    digest: str
    uploaded_count: int
    uploaded_bytes: int

    @property
    def uploaded_blobs(self) -> int:  # the name `tether bundle` and `tether demo` print
        return self.uploaded_count


@dataclasses.dataclass(frozen=True)
class RevokeResult:
    device_id: str
    revoked: bool  # False when it already was
    disconnected: bool  # its live stream on the answering controller process was ended


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSummary:
    """One device of the inventory (`list_devices`)."""

    device_id: str
    labels: Mapping[str, str]
    backends: tuple[str, ...]
    selected_backends: tuple[str, ...]  # "release/model=engine/backend/tN/precision"
    last_seen_unix: float | None
    revoked: bool
    releases: tuple[tuple[str, int, str], ...]  # (release, version, delivery state)
    device_state: Mapping[str, str] = dataclasses.field(default_factory=dict)  # charging/.../waiting
    connected_replica: str = ""  # the controller replica holding its stream; "": not connected


@dataclasses.dataclass(frozen=True)
class TriggerRunResult:
    request_id: str
    version: int  # the version devices are asked to run
    devices: int  # connected devices the request was queued for


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    release: str
    version: int
    changed: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseStatus:
    release: str
    version: int
    manifest_digest: str
    targeted: int
    notified: int
    installed: int
    succeeded: int
    failed: int
    refused: int
    results: int
    connected_devices: int
    aggregate_round: int
    aggregate: Mapping[str, Any] | None  # the latest aggregate body, None before the first round
    aggregate_json: str  # the same, as the controller sent it ("" before the first round)
    health: Mapping[str, Any] | None = None  # per-stage health of a staged rollout (docs/internals.md)
    federated: Mapping[str, Any] | None = None  # a federated release's rounds (docs/internals.md "Federated rounds")
    not_reporting: int = 0  # told about the current version, silent past report_deadline_s (staged or not)
    report_deadline_s: int = 0

    @classmethod
    def from_proto(cls, m: pb.ReleaseStatus) -> ReleaseStatus:
        return cls(
            release=m.release,
            version=m.version,
            manifest_digest=m.manifest_digest,
            targeted=m.targeted,
            notified=m.notified,
            installed=m.installed,
            succeeded=m.succeeded,
            failed=m.failed,
            refused=m.refused,
            results=m.results,
            connected_devices=m.connected_devices,
            aggregate_round=m.aggregate_round,
            aggregate=json.loads(m.aggregate_json) if m.aggregate_json else None,
            aggregate_json=m.aggregate_json,
            health=json.loads(m.health_json) if m.health_json else None,
            federated=json.loads(m.federated_json) if m.federated_json else None,
            not_reporting=m.not_reporting,
            report_deadline_s=m.report_deadline_seconds,
        )


class AdminClient:
    """`async with AdminClient(target=..., token=...) as admin: await admin.list_releases()`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str,
        root_certificates: bytes | None = None,
        timeout_s: float = 30.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: tls_mod.ClientTLS | None = None,
    ) -> None:
        """`tls` (CA, optional client certificate for mTLS) wins over the bare `root_certificates`."""
        self.target = target or config.controller_target()
        self._metadata = auth.bearer_metadata(token)
        self._timeout_s = timeout_s
        self._chunk_size = chunk_size
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is not None and tls.enabled:
            creds = tls.channel_credentials()
            assert creds is not None
            self._channel = grpc.aio.secure_channel(self.target, creds, options=[*options, *tls.channel_options()])
        elif root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.AdminServiceStub(self._channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, *, timeout_s: float | None = None) -> Any:
        try:
            return await method(
                request, metadata=tracing.metadata(self._metadata), timeout=timeout_s or self._timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    # ------------------------------------------------------------ blobs and bundles

    async def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        response = await self._call(self._stub.MissingBlobs, pb.MissingBlobsRequest(digests=list(digests)))
        return list(response.missing)

    async def put_blob(self, path: pathlib.Path | str, *, digest: str | None = None) -> int:
        """Stream a file to the controller; return its size. DigestMismatch when it does not hash to `digest`."""
        path = pathlib.Path(path)
        if digest is None:
            digest, _ = await asyncio.to_thread(manifest.file_digest, path)
        assert digest is not None
        manifest.check_digest(digest)
        call = self._stub.PutBlob(
            metadata=self._metadata,
            # A 2 GiB blob on a slow link takes a while: scale the deadline with the size.
            timeout=self._timeout_s + path.stat().st_size / (1024 * 1024),
        )
        try:
            async for chunk in _file_chunks(path, digest=digest, chunk_size=self._chunk_size):
                await call.write(chunk)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The controller ended the call before reading everything (too large, a bad digest): a write
            # then fails with whatever the transport saw; the call's own status says why.
            pass
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        return int(response.size)

    async def put_manifest(self, body: bytes, *, signature: bytes = b"", key_id: str = "") -> str:
        response = await self._call(
            self._stub.PutManifest, pb.PutManifestRequest(manifest=body, signature=signature, key_id=key_id)
        )
        return str(response.digest)

    async def upload_bundle(
        self,
        directory: pathlib.Path | str,
        bundle: manifest.Manifest,
        *,
        signature: bytes = b"",
        key_id: str = "",
    ) -> BundleUpload:
        """Upload the blobs the controller lacks, then the manifest: (digest, uploaded_count, uploaded_bytes)."""
        directory = pathlib.Path(directory)
        missing = set(await self.missing_blobs(bundle.blob_digests()))
        count = 0
        size = 0
        for entry in bundle.files:
            if entry.sha256 not in missing:
                continue
            missing.discard(entry.sha256)  # two files with equal content share one blob
            size += await self.put_blob(directory / entry.path, digest=entry.sha256)
            count += 1
        digest = await self.put_manifest(bundle.canonical_bytes(), signature=signature, key_id=key_id)
        if digest != bundle.digest:
            raise errors.DigestMismatch(f"controller stored the manifest as {digest}, expected {bundle.digest}")
        return BundleUpload(digest=digest, uploaded_count=count, uploaded_bytes=size)

    # ------------------------------------------------------------ releases

    async def apply_release(
        self,
        *,
        release: str,
        manifest_digest: str,
        generation: int = 0,
        target: selectors.Target | Mapping[str, Any] | None = None,
        trigger: Mapping[str, Any] | None = None,
        aggregation: Mapping[str, Any] | None = None,
        paused: bool = False,
        resources: spec_resources.Resources | Mapping[str, Any] | None = None,
        rollout: staging.Rollout | Mapping[str, Any] | None = None,
        federated: Mapping[str, Any] | None = None,
    ) -> ApplyResult:
        """Create or update a release. `resources`: `{"timeoutSeconds", "memoryMB", "cpuSeconds"}` (all optional).

        Typed values (the operator's) travel in the typed fields of
        `ReleaseSpec`; plain documents as JSON, validated by the controller
        (`tether.spec.wire.release_spec`).
        """
        spec = wire.release_spec(
            release=release,
            generation=generation,
            manifest_digest=manifest_digest,
            target=target,
            trigger=trigger,
            aggregation=aggregation,
            paused=paused,
            resources=resources,
            rollout=rollout,
            federated=federated,
        )
        response = await self._call(self._stub.ApplyRelease, pb.ApplyReleaseRequest(spec=spec))
        return ApplyResult(release=response.release, version=response.version, changed=response.changed)

    async def export_round_model(self, release: str, round_number: int, path: pathlib.Path | str) -> str:
        """Write a federated round's global model (round 0: the base bundle's) to `path`; its digest."""
        target = pathlib.Path(path)
        digest = ""
        h = hashlib.sha256()
        try:
            with target.open("wb") as out:
                call = self._stub.ExportRoundModel(
                    pb.RoundModelRequest(release=release, round=round_number), metadata=self._metadata
                )
                async for chunk in call:
                    digest = digest or chunk.digest
                    h.update(chunk.data)
                    out.write(chunk.data)
        except grpc.aio.AioRpcError as e:
            target.unlink(missing_ok=True)
            raise error_from_rpc(e) from None
        if digest and "sha256:" + h.hexdigest() != digest:
            target.unlink(missing_ok=True)
            raise errors.DigestMismatch(f"the exported model does not hash to {digest}")
        return digest

    async def rollback_round(self, release: str, round_number: int) -> pb.RollbackRoundResponse:
        """Serve a federated round's model again (round 0: the base bundle's); the next round trains from it."""
        response: pb.RollbackRoundResponse = await self._call(
            self._stub.RollbackRound, pb.RoundModelRequest(release=release, round=round_number)
        )
        return response

    async def delete_release(self, release: str) -> bool:
        response = await self._call(self._stub.DeleteRelease, pb.DeleteReleaseRequest(release=release))
        return bool(response.deleted)

    async def get_release_status(self, release: str, *, report_deadline_s: int | None = None) -> ReleaseStatus:
        """The release's counts; `report_deadline_s`: the deadline `not_reporting` is counted with (None: its own)."""
        request = pb.GetReleaseStatusRequest(release=release, report_deadline_seconds=report_deadline_s)
        response = await self._call(self._stub.GetReleaseStatus, request)
        return ReleaseStatus.from_proto(response)

    async def list_releases(self) -> list[ReleaseStatus]:
        response = await self._call(self._stub.ListReleases, pb.ListReleasesRequest())
        return [ReleaseStatus.from_proto(r) for r in response.releases]

    # ------------------------------------------------------------ devices

    async def revoke_device(self, device_id: str) -> RevokeResult:
        """Revoke a device: its credential stops working, its stream ends, it cannot enrol again."""
        response = await self._call(self._stub.RevokeDevice, pb.RevokeDeviceRequest(device_id=device_id))
        return RevokeResult(device_id=device_id, revoked=response.revoked, disconnected=response.disconnected)

    async def list_devices(
        self, *, page_size: int = 100, include_revoked: bool = False, limit: int | None = None
    ) -> list[DeviceSummary]:
        """The inventory by device id, fetched a page (`page_size`) at a time; at most `limit` devices."""
        out: list[DeviceSummary] = []
        token = ""
        while limit is None or len(out) < limit:
            response = await self._call(
                self._stub.ListDevices,
                pb.ListDevicesRequest(page_size=page_size, page_token=token, include_revoked=include_revoked),
            )
            out.extend(
                DeviceSummary(
                    device_id=d.device_id,
                    labels=dict(d.attributes),
                    backends=tuple(d.backends),
                    selected_backends=tuple(d.selected_backends),
                    last_seen_unix=d.last_seen_unix or None,
                    revoked=d.revoked,
                    releases=tuple((r.release, r.version, r.state) for r in d.releases),
                    device_state=dict(d.device_state),
                    connected_replica=d.connected_replica,
                )
                for d in response.devices
            )
            token = response.next_page_token
            if not token:
                break
        return out if limit is None else out[:limit]

    # ------------------------------------------------------------ on-demand runs

    async def trigger_run(
        self, release: str, *, payload: Mapping[str, Any] | None = None, request_id: str = ""
    ) -> TriggerRunResult:
        """Run `release` now on the connected devices it targets (they get `payload` as ctx.inputs["payload"])."""
        request = pb.TriggerRunRequest(
            release=release, payload_json=json.dumps(dict(payload or {}), sort_keys=True), request_id=request_id
        )
        response = await self._call(self._stub.TriggerRun, request)
        return TriggerRunResult(request_id=response.request_id, version=response.version, devices=response.devices)


async def _file_chunks(path: pathlib.Path, *, digest: str, chunk_size: int) -> AsyncIterator[pb.PutBlobChunk]:
    f = await asyncio.to_thread(path.open, "rb")
    try:
        first = True
        while True:
            data = await asyncio.to_thread(f.read, chunk_size)
            if not data and not first:
                return
            yield pb.PutBlobChunk(digest=digest if first else "", data=data)
            first = False
            if not data:
                return
    finally:
        await asyncio.to_thread(f.close)
