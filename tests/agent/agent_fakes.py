"""A scriptable in-process DeviceService on a real gRPC server (loopback, port 0).

Stands in for the controller in the agent's protocol tests: it serves what the
test put in it (manifests, blobs, desired state), can misbehave on purpose
(tampered bytes, dropped streams, failing uploads), and records what the agent did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import secrets

import grpc

from tether.common import auth, bundle_files
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

BOOTSTRAP = "bootstrap-token-for-tests"


@dataclasses.dataclass
class Release:
    name: str
    version: int
    digest: str
    trigger_json: str = ""
    resources_json: str = ""


class FakeController(pb_grpc.DeviceServiceServicer):
    def __init__(self, *, chunk_size: int = 4096) -> None:
        self.chunk_size = chunk_size
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.releases: dict[str, Release] = {}
        self.devices: dict[str, pb.DeviceInfo] = {}
        self.secrets: dict[str, str] = {}
        self.queues: dict[str, asyncio.Queue[pb.ServerEvent]] = {}
        self.statuses: list[tuple[str, str, int, str, str]] = []
        self.uploads: dict[str, pb.UploadResultRequest] = {}
        self.upload_attempts: list[str] = []
        self.pulls: list[tuple[str, int]] = []  # (digest, offset) per blob asked for, by PullBlob or PullBlobs
        self.pull_calls: list[str] = []  # "PullBlob" / "PullBlobs", one per call
        self.enrollments = 0
        # misbehaviour knobs
        self.tamper_blobs: set[str] = set()
        self.tamper_manifests: set[str] = set()
        self.drop_after: dict[str, int] = {}  # digest -> bytes served before the stream breaks (once)
        self.fail_uploads = 0
        self.pull_blobs_unimplemented = False  # act as a controller older than PullBlobs
        self.inline_manifests = False  # carry GetManifest's answer in each Notify, as the controller does
        self.manifest_calls = 0  # GetManifest calls served
        self.pull_spread_ms = 0  # Notify.pull_spread_ms of each publish
        self.pull_times: list[float] = []  # loop time of each PullBlob(s) call

    # ------------------------------------------------------------ test API
    def publish(
        self,
        release: str,
        bundle_dir: pathlib.Path,
        *,
        version: int | None = None,
        trigger: dict | str | None = None,
        resources: dict | str | None = None,
    ) -> Release:
        """Announce a bundle as the next version; `trigger` / `resources` as documents, or raw wire text."""
        m = bundle_files.build_manifest(bundle_dir)
        data = m.canonical_bytes()
        self.manifests[m.digest] = data
        for f in m.files:
            self.blobs[f.sha256] = (bundle_dir / f.path).read_bytes()
        previous = self.releases.get(release)
        rel = Release(
            release,
            version or (previous.version + 1 if previous else 1),
            m.digest,
            trigger_json=_wire(trigger),
            resources_json=_wire(resources),
        )
        self.releases[release] = rel
        notify = pb.Notify(task=self._desired(rel), pull_spread_ms=self.pull_spread_ms)
        if self.inline_manifests:
            notify.manifest.CopyFrom(self._manifest_response(m.digest, data))
        for q in self.queues.values():
            q.put_nowait(pb.ServerEvent(notify=notify))
        return rel

    def _manifest_response(self, digest: str, data: bytes) -> pb.GetManifestResponse:
        if digest in self.tamper_manifests:
            data = data.replace(b'"size":', b'"size": ', 1)
        return pb.GetManifestResponse(manifest=data)

    def revoke(self, release: str) -> None:
        self.releases.pop(release)
        for q in self.queues.values():
            q.put_nowait(pb.ServerEvent(revoke=pb.Revoke(release=release)))

    def states(self, release: str, device: str | None = None, *, progress: bool = True) -> list[str]:
        """States reported on `release`; `progress=False` leaves out DOWNLOADING, which an agent reports
        only for an install still running after `client.DOWNLOADING_REPORT_AFTER_S` (timing-dependent)."""
        return [
            s
            for d, r, _, s, _ in self.statuses
            if r == release and (device is None or d == device) and (progress or s != "DOWNLOADING")
        ]

    @staticmethod
    def _desired(rel: Release) -> pb.DesiredTask:
        return pb.DesiredTask(
            release=rel.name,
            version=rel.version,
            manifest_digest=rel.digest,
            trigger_json=rel.trigger_json,
            resources_json=rel.resources_json,
        )

    async def _device(self, context: grpc.aio.ServicerContext) -> str:
        try:
            cred = auth.parse_credential(auth.bearer_token(context.invocation_metadata()))
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if self.secrets.get(cred.device_id) != cred.secret:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device")
        return cred.device_id

    # ------------------------------------------------------------ DeviceService
    async def Enroll(self, request, context):
        if request.bootstrap_token != BOOTSTRAP:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad bootstrap token")
        self.enrollments += 1
        device_id = request.device.device_id or f"dev-{secrets.token_hex(4)}"
        self.devices[device_id] = request.device
        self.secrets[device_id] = secrets.token_urlsafe(24)
        return pb.EnrollResponse(device_id=device_id, credential=f"{device_id}.{self.secrets[device_id]}")

    async def Subscribe(self, request, context):
        device = await self._device(context)
        queue: asyncio.Queue[pb.ServerEvent] = asyncio.Queue()
        self.queues[device] = queue
        try:
            yield pb.ServerEvent(sync=pb.Sync(desired=[self._desired(r) for r in self.releases.values()]))
            while True:
                yield await queue.get()
        finally:
            if self.queues.get(device) is queue:
                del self.queues[device]

    async def GetManifest(self, request, context):
        await self._device(context)
        self.manifest_calls += 1
        data = self.manifests.get(request.manifest_digest)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such manifest")
        return self._manifest_response(request.manifest_digest, data)

    async def PullBlob(self, request, context):
        await self._device(context)
        data = self.blobs.get(request.digest)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        if request.digest in self.tamper_blobs:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.pulls.append((request.digest, request.offset))
        self.pull_calls.append("PullBlob")
        self.pull_times.append(asyncio.get_running_loop().time())
        limit = self.drop_after.pop(request.digest, None)
        offset = request.offset
        while offset < len(data):
            if limit is not None and offset >= limit:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (simulated)")
            chunk = data[offset : offset + self.chunk_size]
            yield pb.BlobChunk(offset=offset, data=chunk, total_size=len(data))
            offset += len(chunk)

    async def PullBlobs(self, request, context):
        if self.pull_blobs_unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        await self._device(context)
        self.pull_calls.append("PullBlobs")
        self.pull_times.append(asyncio.get_running_loop().time())
        for r in request.blobs:
            if r.digest not in self.blobs:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no such blob {r.digest}")
        for r in request.blobs:
            data = self.blobs[r.digest]
            if r.digest in self.tamper_blobs:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.pulls.append((r.digest, r.offset))
            limit = self.drop_after.pop(r.digest, None)
            offset = r.offset
            while True:
                if limit is not None and offset >= limit:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (simulated)")
                chunk = data[offset : offset + self.chunk_size]
                yield pb.BlobChunk(offset=offset, data=chunk, total_size=len(data), digest=r.digest)
                offset += len(chunk)
                if offset >= len(data):
                    break

    async def ReportStatus(self, request, context):
        device = await self._device(context)
        name = pb.DeliveryState.Name(request.state).removeprefix("DELIVERY_STATE_")
        self.statuses.append((device, request.release, request.version, name, request.message))
        return pb.ReportStatusResponse()

    async def UploadResult(self, request, context):
        await self._device(context)
        self.upload_attempts.append(request.idempotency_key)
        if self.fail_uploads > 0:
            self.fail_uploads -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable (simulated)")
        duplicate = request.idempotency_key in self.uploads
        self.uploads.setdefault(request.idempotency_key, request)
        return pb.UploadResultResponse(duplicate=duplicate)


def _wire(doc: dict | str | None) -> str:
    if doc is None:
        return ""
    return doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True)


async def start_fake() -> tuple[grpc.aio.Server, FakeController, str]:
    server = grpc.aio.server()
    fake = FakeController()
    pb_grpc.add_DeviceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, fake, f"127.0.0.1:{port}"


async def wait_until(predicate, *, timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def write_bundle(root: pathlib.Path, task_source: str, *, name: str = "t", extra: dict[str, bytes] | None = None):
    """A bundle directory with no engine: task.py + bundle.yaml (+ extra files)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(task_source)
    (root / "bundle.yaml").write_text(f"name: {name}\nentrypoint: task.py\n")
    for rel, data in (extra or {}).items():
        (root / rel).write_bytes(data)
    return root
