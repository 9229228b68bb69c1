"""Lightweight simulated agents for the fleet benchmark: the real protocol, no models.

A `SimAgent` speaks the device protocol exactly as `tether.agent.daemon.Agent`
does — Enroll, then Subscribe (opening Sync, Notify, Revoke, heartbeats) with
jittered exponential backoff, the manifest from the Notify or else GetManifest
(sha256-checked against the announced digest), one PullBlobs call for all the
blobs it lacks (each resumed from the last received offset after an error,
sha256-verified; PullBlob per blob from a controller without PullBlobs),
ReportStatus DOWNLOADING (only when an install runs past 1 s) and INSTALLED —
but keeps its content-addressed cache as a set of digests in
memory and never runs a task. Thousands share one event loop; `run_worker`
runs a batch in a child process controlled over a pipe, so a benchmark can
spread a fleet over several processes (`tether bench fleet`).

Two baselines run the same code:
- `mode="poll"`: no stream; GetDesired every `poll_s` seconds, starting at a
  uniformly random phase (what a fleet of polling devices looks like).
- `full_pull=True`: pulls every blob of each new version, cached or not: the
  bytes a protocol that pushes the whole bundle would move.

Each agent records, per (release, version), when it first heard of it (and
the controller's `Notify.sent_at_ms`) and when the version was installed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from tether.agent import client
from tether.common import auth, manifest, rlimits
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

S = pb.DeliveryState
RETRYABLE = client.RETRYABLE
Backoff = client.Backoff  # the real agent's, so simulated retries pace like real ones
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


@dataclasses.dataclass
class Timeline:
    """What one agent saw of one (release, version)."""

    heard_at: float = 0.0  # wall clock when the agent first learnt of the version (Sync, Notify or poll)
    sent_at_ms: int = 0  # Notify.sent_at_ms (0 when learnt otherwise)
    installed_at: float = 0.0


@dataclasses.dataclass
class _Partial:
    offset: int = 0
    hasher: Any = dataclasses.field(default_factory=hashlib.sha256)


def new_channel(target: str, *, root_pem: bytes | None = None) -> grpc.aio.Channel:
    """A channel with its own TCP connection (gRPC otherwise shares subchannels between equal channels)."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if root_pem is not None:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_pem), options)
    return grpc.aio.insecure_channel(target, options=options)


class SimAgent:
    def __init__(
        self,
        *,
        channel: grpc.aio.Channel,
        device_id: str,
        attributes: Mapping[str, str],
        bootstrap_token: str,
        mode: str = "push",
        poll_s: float = 30.0,
        full_pull: bool = False,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if mode not in ("push", "poll"):
            raise ValueError(f"mode must be push or poll, not {mode!r}")
        self.device_id = device_id
        self.attributes = dict(attributes)
        self.mode = mode
        self.poll_s = poll_s
        self.full_pull = full_pull
        self.backoff = backoff
        self._bootstrap_token = bootstrap_token
        self._stub = pb_grpc.DeviceServiceStub(channel)
        self._rng = rng or random.Random(device_id)
        self._timeout_s = timeout_s
        self.credential = ""
        self.connected = False
        self.errors = 0
        self.error_codes: collections.Counter[str] = collections.Counter()  # by status code and RPC
        self.installed: dict[str, tuple[int, str]] = {}  # release -> (version, manifest digest)
        self.cache: set[str] = set()  # blob digests held (content-addressed, shared by every release)
        self._manifests: dict[str, list[list[str]]] = {}  # release -> blob digests of [previous, current]
        self._notified = client.NotifyExtras(self._rng)  # manifests and pull moments Notifies carried
        self.timelines: dict[tuple[str, int], Timeline] = {}
        self._desired: dict[str, pb.DesiredTask] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        self._partials: dict[str, _Partial] = {}
        self.pull_blobs = True  # False after the controller answered PullBlobs with UNIMPLEMENTED

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Enrol, then hold the stream (or poll) until cancelled."""
        try:
            await self._enroll()
            if self.mode == "push":
                await self._stream_forever()
            else:
                await self._poll_forever()
        finally:
            for w in self._workers.values():
                w.cancel()
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    def _count(self, error: grpc.aio.AioRpcError, what: str) -> None:
        self.errors += 1
        self.error_codes[f"{what}:{error.code().name}"] += 1

    def _md(self) -> tuple[tuple[str, str], ...]:
        return auth.bearer_metadata(self.credential)

    async def _enroll(self) -> None:
        attempt = 0
        while not self.credential:
            try:
                info = pb.DeviceInfo(device_id=self.device_id, attributes=self.attributes, backends=["mnn/cpu"])
                response = await self._stub.Enroll(
                    pb.EnrollRequest(bootstrap_token=self._bootstrap_token, device=info), timeout=self._timeout_s
                )
                self.credential = response.credential
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                self._count(e, "Enroll")
                await asyncio.sleep(self.backoff.delay(attempt, self._rng))
                attempt += 1

    async def _stream_forever(self) -> None:
        attempt = 0
        while True:
            call = self._stub.Subscribe(pb.SubscribeRequest(), metadata=self._md())
            try:
                async for event in call:
                    if not self.connected:
                        self.connected, attempt = True, 0
                        self.pull_blobs = True  # maybe a newer controller now
                    self._on_event(event)
            except grpc.aio.AioRpcError as e:
                self._count(e, "Subscribe")
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.credential = ""
                    await self._enroll()
            finally:
                call.cancel()
                self.connected = False
            await asyncio.sleep(self.backoff.delay(attempt, self._rng))
            attempt += 1

    async def _poll_forever(self) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.poll_s))  # devices poll at independent phases
        self.connected = True
        next_at = time.monotonic()
        while True:
            try:
                sync = await self._stub.GetDesired(pb.GetDesiredRequest(), metadata=self._md(), timeout=self._timeout_s)
                self._on_sync(sync, heard_at=time.time())
            except grpc.aio.AioRpcError as e:
                self._count(e, "GetDesired")
            next_at += self.poll_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    # ------------------------------------------------------------ events
    def _on_event(self, event: pb.ServerEvent) -> None:
        kind = event.WhichOneof("event")
        now = time.time()
        if kind == "sync":
            self._on_sync(event.sync, heard_at=now)
        elif kind == "notify":
            self._notified.heard(event.notify, now=time.monotonic())  # as the real agent does
            self._want(event.notify.task, heard_at=now, sent_at_ms=event.notify.sent_at_ms)
        elif kind == "revoke":
            self._desired.pop(event.revoke.release, None)
            self._notified.forget(event.revoke.release)
            self.installed.pop(event.revoke.release, None)
            self._manifests.pop(event.revoke.release, None)
            self._gc()

    def _on_sync(self, sync: pb.Sync, *, heard_at: float) -> None:
        wanted = {t.release for t in sync.desired}
        for release in list(self.installed):
            if release not in wanted:
                self.installed.pop(release, None)
                self._manifests.pop(release, None)
        for task in sync.desired:
            self._want(task, heard_at=heard_at, sent_at_ms=0)
        self._gc()

    def _want(self, task: pb.DesiredTask, *, heard_at: float, sent_at_ms: int) -> None:
        current = self.installed.get(task.release)
        if current is not None and current[0] >= task.version:
            return
        timeline = self.timelines.setdefault((task.release, task.version), Timeline())
        if not timeline.heard_at:
            timeline.heard_at, timeline.sent_at_ms = heard_at, sent_at_ms
        known = self._desired.get(task.release)
        if known is not None and known.version >= task.version:
            return
        self._desired[task.release] = task
        self._kicks.setdefault(task.release, asyncio.Event()).set()
        worker = self._workers.get(task.release)
        if worker is None or worker.done():
            self._workers[task.release] = asyncio.create_task(self._converge(task.release))

    # ------------------------------------------------------------ install
    async def _converge(self, release: str) -> None:
        kick = self._kicks[release]
        attempt = 0
        while True:
            kick.clear()
            task = self._desired.get(release)
            current = self.installed.get(release)
            if task is None or (current is not None and current[0] >= task.version):
                await kick.wait()
                continue
            delay = self._notified.pull_delay(release, now=time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await self._install(task)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self._count(e, "install")
                if e.code() not in RETRYABLE:  # refused for good (e.g. untargeted meanwhile): wait for news
                    await kick.wait()
                    continue
                await asyncio.sleep(self.backoff.delay(attempt, self._rng))
                attempt += 1

    async def _install(self, task: pb.DesiredTask) -> None:
        progress = client.LateReport(lambda: self._report(task, S.DELIVERY_STATE_DOWNLOADING))
        try:
            inline = self._notified.manifest(task.manifest_digest)  # carried by the Notify, as the real agent uses it
            body = inline.manifest if inline is not None else None
            if body is None:
                response = await self._stub.GetManifest(
                    pb.GetManifestRequest(release=task.release, manifest_digest=task.manifest_digest),
                    metadata=self._md(),
                    timeout=self._timeout_s,
                )
                body = response.manifest
            if "sha256:" + hashlib.sha256(body).hexdigest() != task.manifest_digest:
                raise RuntimeError(f"{self.device_id}: manifest of {task.release} does not match its digest")
            blobs = _blob_sizes(body)
            await self._pull_all(
                task.release, {d: n for d, n in blobs.items() if self.full_pull or d not in self.cache}
            )
        finally:
            await progress.settle()
        self.installed[task.release] = (task.version, task.manifest_digest)
        history = self._manifests.setdefault(task.release, [])
        history.append(list(blobs))
        del history[:-2]  # keep the previous version for rollback, like the real agent
        self.timelines.setdefault((task.release, task.version), Timeline()).installed_at = time.time()
        await self._report(task, S.DELIVERY_STATE_INSTALLED)
        self._gc()

    async def _pull_all(self, release: str, sizes: Mapping[str, int]) -> None:
        """Every blob of `sizes` with one PullBlobs call (per MAX_BLOBS_PER_PULL), as the real agent does."""
        digests = list(sizes)
        for start in range(0, len(digests), manifest.MAX_BLOBS_PER_PULL):
            group = digests[start : start + manifest.MAX_BLOBS_PER_PULL]
            if self.pull_blobs:
                try:
                    await self._pull_group(release, group, sizes)
                    continue
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self.pull_blobs = False  # an older controller: blob by blob (nothing of the group arrived)
            for digest in group:
                await self._pull(release, digest, sizes[digest])

    async def _pull_group(self, release: str, digests: Sequence[str], sizes: Mapping[str, int]) -> None:
        """A broken stream that made progress is asked again at once for the rest, from the offsets reached."""
        remaining = list(digests)
        while remaining:
            before = (len(remaining), self._received(remaining))
            try:
                await self._pull_stream(release, remaining, sizes)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or (len(remaining), self._received(remaining)) == before:
                    raise
                self._count(e, "PullBlobs")

    def _received(self, digests: Sequence[str]) -> int:
        return sum(p.offset for d in digests if (p := self._partials.get(d)) is not None)

    def _partial(self, digest: str) -> _Partial:
        partial = self._partials.setdefault(digest, _Partial())
        if self.full_pull and partial.offset == 0:
            partial.hasher = hashlib.sha256()
        return partial

    async def _pull_stream(self, release: str, remaining: list[str], sizes: Mapping[str, int]) -> None:
        """One PullBlobs call; removes each blob from `remaining` once it is complete and verified."""
        ranges = [pb.BlobRange(digest=d, offset=self._partial(d).offset) for d in remaining]
        call = self._stub.PullBlobs(
            pb.PullBlobsRequest(release=release, blobs=ranges), metadata=self._md(), timeout=self._timeout_s
        )
        try:
            async for chunk in call:
                if not remaining or chunk.digest != remaining[0]:
                    raise RuntimeError(f"{self.device_id}: PullBlobs sent {chunk.digest!r} out of order")
                digest = remaining[0]
                partial = self._partials[digest]
                if chunk.offset != partial.offset:
                    raise RuntimeError(f"{digest}: chunk at {chunk.offset}, expected {partial.offset}")
                partial.hasher.update(chunk.data)
                partial.offset += len(chunk.data)
                if partial.offset >= sizes[digest]:
                    self._verified(digest, sizes[digest])
                    remaining.pop(0)
        finally:
            call.cancel()
        if remaining:
            raise RuntimeError(f"{self.device_id}: PullBlobs ended before blob {remaining[0]} was complete")

    async def _pull(self, release: str, digest: str, size: int) -> None:
        """One blob with PullBlob (a controller without PullBlobs)."""
        partial = self._partial(digest)
        call = self._stub.PullBlob(
            pb.PullBlobRequest(release=release, digest=digest, offset=partial.offset),
            metadata=self._md(),
            timeout=self._timeout_s,
        )
        try:
            async for chunk in call:
                if chunk.offset != partial.offset:
                    raise RuntimeError(f"{digest}: chunk at {chunk.offset}, expected {partial.offset}")
                partial.hasher.update(chunk.data)
                partial.offset += len(chunk.data)
        finally:
            call.cancel()
        self._verified(digest, size)

    def _verified(self, digest: str, size: int) -> None:
        """The blob's download is complete: check size and digest, then hold it."""
        partial = self._partials.pop(digest)
        if partial.offset != size or "sha256:" + partial.hasher.hexdigest() != digest:
            raise RuntimeError(f"{self.device_id}: blob {digest} failed verification")
        self.cache.add(digest)

    async def _report(self, task: pb.DesiredTask, state: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.ReportStatus(
                pb.ReportStatusRequest(release=task.release, version=task.version, state=state),
                metadata=self._md(),
                timeout=self._timeout_s,
            )

    def _gc(self) -> None:
        """Drop blobs no kept version references (the real agent's `BundleStore.gc`)."""
        keep = {d for versions in self._manifests.values() for blobs in versions for d in blobs}
        self.cache &= keep


def _blob_sizes(body: bytes) -> dict[str, int]:
    """Distinct blobs of a manifest and their sizes (validated like the real agent does)."""
    return {f.sha256: f.size for f in manifest.Manifest.from_bytes(body).files}


# ---------------------------------------------------------------- worker processes


class Batch:
    """The agents of one worker process, and the answers to the benchmark's commands."""

    def __init__(self) -> None:
        self.agents: list[SimAgent] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[grpc.aio.Channel] = []

    def start(
        self,
        *,
        target: str,
        bootstrap_token: str,
        agents: Sequence[tuple[str, Mapping[str, str]]],
        mode: str = "push",
        poll_s: float = 30.0,
        full_pull: bool = False,
        share: int = 1,
        ramp_s: float = 0.0,
        root_pem: bytes | None = None,
    ) -> None:
        channel: grpc.aio.Channel | None = None
        for i, (device_id, attributes) in enumerate(agents):
            if channel is None or i % max(1, share) == 0:
                channel = new_channel(target, root_pem=root_pem)  # `share` agents use this one connection
                self.channels.append(channel)
            agent = SimAgent(
                channel=channel,
                device_id=device_id,
                attributes=attributes,
                bootstrap_token=bootstrap_token,
                mode=mode,
                poll_s=poll_s,
                full_pull=full_pull,
            )
            self.agents.append(agent)
            delay = ramp_s * i / max(1, len(agents))
            self.tasks.append(asyncio.create_task(_delayed(agent.run(), delay)))

    def status(self) -> dict[str, Any]:
        installed: dict[str, dict[int, int]] = {}
        for a in self.agents:
            for release, (version, _) in a.installed.items():
                per = installed.setdefault(release, {})
                per[version] = per.get(version, 0) + 1
        return {
            "agents": len(self.agents),
            "enrolled": sum(1 for a in self.agents if a.credential),
            "connected": sum(1 for a in self.agents if a.connected),
            "installed": {r: {str(v): n for v, n in per.items()} for r, per in installed.items()},
            "errors": sum(a.errors for a in self.agents),
            "error_codes": dict(sum((a.error_codes for a in self.agents), collections.Counter()).most_common(6)),
            "crashed": sum(1 for t in self.tasks if t.done() and not t.cancelled() and t.exception() is not None),
            "cpu_s": sum(os.times()[:2]),  # this worker process: where the simulator, not the server, is busy
        }

    def collect(self, release: str, version: int) -> list[tuple[float, int, float]]:
        out = []
        for a in self.agents:
            t = a.timelines.get((release, version))
            if t is not None:
                out.append((t.heard_at, t.sent_at_ms, t.installed_at))
        return out

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ch in self.channels:
            with contextlib.suppress(Exception):
                await ch.close(None)
        self.agents, self.tasks, self.channels = [], [], []


async def _delayed(coro: Any, delay: float) -> None:
    if delay > 0:
        await asyncio.sleep(delay)
    await coro


def run_worker(conn: Any) -> None:
    """Child-process entry point: obey commands from the pipe `conn` until told to exit.

    Commands are dicts with a "cmd" key: start (Batch.start's keyword arguments),
    status, collect (release, version), stop, exit. Every command gets one reply.
    """
    rlimits.raise_open_files_limit()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn))


async def _serve(conn: Any) -> None:
    loop = asyncio.get_running_loop()
    batch = Batch()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    try:
        while True:
            msg = await inbox.get()
            cmd = msg.pop("cmd")
            try:
                if cmd == "start":
                    batch.start(**msg)
                    conn.send({"ok": True})
                elif cmd == "status":
                    conn.send(batch.status())
                elif cmd == "collect":
                    conn.send({"records": batch.collect(msg["release"], int(msg["version"]))})
                elif cmd == "stop":
                    await batch.stop()
                    conn.send({"ok": True})
                elif cmd == "exit":
                    await batch.stop()
                    conn.send({"ok": True})
                    return
                else:
                    conn.send({"error": f"unknown command {cmd!r}"})
            except Exception as e:  # report, keep serving: the benchmark decides what to do
                conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        loop.remove_reader(conn.fileno())
