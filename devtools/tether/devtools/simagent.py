"""Lightweight simulated agents for the fleet benchmark: the agent's own protocol code, no models.

A `SimAgent` runs the real agent's session and pull rooms — `tether.agent.session`
(Enroll, then Subscribe: opening Sync, Notify, Revoke, heartbeats, reconnects
with jittered exponential backoff) and `tether.agent.pull` (the manifest from
the Notify or else GetManifest, verified; one PullBlobs call for all the blobs
it lacks, resumed from the offsets reached after an error; PullBlob per blob
from a controller without PullBlobs; the Notify's pull spread) — and reports
like it (`tether.agent.reporting`: DOWNLOADING only when an install runs past
1 s, then INSTALLED). What it does not do is keep files or run tasks: its
`DigestSink` hashes and counts each blob and keeps only the digest, so
thousands share one event loop. `run_worker` runs a batch in a child process
controlled over a pipe, so a benchmark can spread a fleet over several
processes (`tether bench fleet`).

With `http=True` it fetches blobs by the URLs the controller hands out (an
origin or object store in front of the blob store) with the agent's own
`tether.agent.httpfetch`, falling back to PullBlobs as the agent does.

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
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from tether.agent import client, httpfetch, pull, reporting, session, statefile
from tether.common import errors, rlimits
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

S = pb.DeliveryState
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


def new_channel(target: str, *, root_pem: bytes | None = None) -> grpc.aio.Channel:
    """A channel with its own TCP connection (gRPC otherwise shares subchannels between equal channels)."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if root_pem is not None:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_pem), options)
    return grpc.aio.insecure_channel(target, options=options)


# ---------------------------------------------------------------- a sink that keeps digests only


class DigestSink:
    """The simulator's `pull.BlobSink`: hashes and counts each blob, keeps its digest, stores no bytes.

    With `full_pull`, blobs it holds are received again (the whole-bundle baseline).
    """

    def __init__(self, *, full_pull: bool = False) -> None:
        self.full_pull = full_pull
        self.cache: set[str] = set()  # blob digests held (content-addressed, shared by every release)
        self._partials: dict[str, _DigestWrite] = {}

    def has(self, digest: str) -> bool:
        return digest in self.cache

    def partial_size(self, digest: str) -> int:
        partial = self._partials.get(digest)
        return 0 if partial is None else partial.offset

    def open(self, digest: str, *, size: int) -> _DigestWrite:
        partial = self._partials.get(digest)
        if partial is None or partial.offset == 0:
            partial = self._partials[digest] = _DigestWrite(self, digest, size)
        return partial

    def verified(self, write: _DigestWrite) -> None:
        self._partials.pop(write.digest, None)
        self.cache.add(write.digest)

    def drop(self, digest: str) -> None:
        self._partials.pop(digest, None)


class _DigestWrite:
    """One blob being received: its running sha256 and byte count."""

    __slots__ = ("_hasher", "_sink", "digest", "offset", "size")

    def __init__(self, sink: DigestSink, digest: str, size: int) -> None:
        self._sink = sink
        self.digest = digest
        self.size = size
        self.offset = 0
        self._hasher = hashlib.sha256()

    def append(self, data: bytes, *, offset: int) -> None:
        if offset != self.offset:
            raise errors.InvalidArgument(f"blob {self.digest}: chunk at offset {offset}, expected {self.offset}")
        if self.offset + len(data) > self.size:
            raise errors.DigestMismatch(f"blob {self.digest}: more than the {self.size} bytes the manifest announced")
        self._hasher.update(data)
        self.offset += len(data)

    async def commit(self) -> None:
        if self.offset != self.size or "sha256:" + self._hasher.hexdigest() != self.digest:
            self._sink.drop(self.digest)
            raise errors.DigestMismatch(f"blob {self.digest}: received {self.offset} bytes that do not hash to it")
        self._sink.verified(self)

    def close(self) -> None:
        pass  # kept for a resume

    def discard(self) -> None:
        self._sink.drop(self.digest)


# ---------------------------------------------------------------- one simulated device


async def _nothing() -> None:
    """Persisting the simulator's state: it keeps none."""


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
        http: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        backoff: client.Backoff = client.Backoff(),
        rng: random.Random | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if mode not in ("push", "poll"):
            raise ValueError(f"mode must be push or poll, not {mode!r}")
        self.device_id = device_id
        self.attributes = dict(attributes)
        self.mode = mode
        self.poll_s = poll_s
        self._rng = rng or random.Random(device_id)
        self.errors = 0
        self.error_codes: collections.Counter[str] = collections.Counter()  # by status code and RPC
        self.installed: dict[str, tuple[int, str]] = {}  # release -> (version, manifest digest)
        self._manifests: dict[str, list[list[str]]] = {}  # release -> blob digests of [previous, current]
        self.timelines: dict[tuple[str, int], Timeline] = {}
        self._desired: dict[str, pb.DesiredTask] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        # The agent's own rooms, on a shared channel, with state in memory and failures counted.
        self.client = client.DeviceClient("", channel=channel, timeout_s=timeout_s)
        self.state = statefile.AgentState(device_id=device_id)
        self.session = session.Session(
            device=self.client,
            state=self.state,
            persist=_nothing,
            describe=self._describe,
            bootstrap_token=bootstrap_token,
            backoff=backoff,
            rng=self._rng,
            observer=self,
            give_up=lambda e: e.code() not in client.RETRYABLE,
        )
        self.sink = DigestSink(full_pull=full_pull)
        self.reporter = reporting.Reporter(device=self.client)
        self.puller = pull.Puller(
            device=self.client,
            sink=self.sink,
            rng=self._rng,
            observer=self,
            timeout_s=timeout_s,
            # Blobs by URL first, as the real agent; its own connections, a TLS context shared by the process.
            http=httpfetch.HttpFetcher(ssl_context=ssl_context) if http else None,
            on_url_failure=self.reporter.note_url_failure,
        )

    @property
    def credential(self) -> str:
        return self.state.credential

    @property
    def connected(self) -> bool:
        return self.session.connected.is_set()

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Enrol, then hold the stream (or poll) until cancelled."""
        try:
            if self.puller.http is not None:
                self.puller.http.prepare()  # a device has its HTTP client from the start, not at its first install
            await self.session.enrol_with_retry()
            if self.mode == "push":
                await self.session.hold(
                    on_event=self._on_event, installed=self._installed, on_connected=self._connected, renew=False
                )
            else:
                await self._poll_forever()
        finally:
            workers = list(self._workers.values())
            if (retry := self.reporter.cancel()) is not None:
                workers.append(retry)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self.puller.http is not None:
                await self.puller.http.close()

    def _installed(self) -> list[pb.DesiredTask]:
        """What this device holds, as the agent tells it on (re)connect: the controller settles deliveries by it."""
        return [pb.DesiredTask(release=r, version=v, manifest_digest=d) for r, (v, d) in sorted(self.installed.items())]

    def _connected(self) -> None:
        self.puller.connected()
        self.reporter.connected()

    def failed(self, what: str, error: grpc.aio.AioRpcError, *, release: str = "") -> None:
        """CallObserver: count it (by RPC and status code)."""
        self.errors += 1
        self.error_codes[f"{what}:{error.code().name}"] += 1

    async def _describe(self) -> pb.DeviceInfo:
        return pb.DeviceInfo(device_id=self.device_id, attributes=self.attributes, backends=["mnn/cpu"])

    async def _poll_forever(self) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.poll_s))  # devices poll at independent phases
        self.session.connected.set()
        next_at = time.monotonic()
        while True:
            try:
                self._on_sync(await self.client.get_desired(), heard_at=time.time())
            except grpc.aio.AioRpcError as e:
                self.failed("GetDesired", e)
            next_at += self.poll_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    # ------------------------------------------------------------ events
    def _on_event(self, event: pb.ServerEvent) -> None:
        kind = event.WhichOneof("event")
        now = time.time()
        if kind == "sync":
            self._on_sync(event.sync, heard_at=now)
        elif kind == "notify":
            self.puller.notified.heard(event.notify, now=time.monotonic())  # as the real agent does
            self._want(event.notify.task, heard_at=now, sent_at_ms=event.notify.sent_at_ms)
        elif kind == "revoke":
            self._desired.pop(event.revoke.release, None)
            self.puller.notified.forget(event.revoke.release)
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
        if _holds(self.installed.get(task.release), task):
            return
        timeline = self.timelines.setdefault((task.release, task.version), Timeline())
        if not timeline.heard_at:
            timeline.heard_at, timeline.sent_at_ms = heard_at, sent_at_ms
        known = self._desired.get(task.release)
        if known is not None and (
            known.version == task.version or (known.version > task.version and not task.rollback)
        ):
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
            if task is None or _holds(self.installed.get(release), task):
                await kick.wait()
                continue
            delay = self.puller.notified.pull_delay(release, now=time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await self._install(task)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self.failed("install", e)
                if e.code() not in client.RETRYABLE:  # refused for good (e.g. untargeted meanwhile): wait for news
                    await kick.wait()
                    continue
                await asyncio.sleep(self.session.backoff.delay(attempt, self._rng))
                attempt += 1

    async def _install(self, task: pb.DesiredTask) -> None:
        progress = self.reporter.downloading(task)
        try:
            bundle = await self.puller.manifest(task)  # the Notify's, or GetManifest; verified as the agent does
            blobs = {f.sha256: f for f in bundle.files}  # distinct blobs
            wanted = [f for d, f in blobs.items() if self.sink.full_pull or not self.sink.has(d)]
            await self.puller.fetch(task.release, wanted)
        finally:
            await progress.settle()
        self.installed[task.release] = (task.version, task.manifest_digest)
        history = self._manifests.setdefault(task.release, [])
        history.append(list(blobs))
        del history[:-2]  # keep the previous version for rollback, like the real agent
        self.timelines.setdefault((task.release, task.version), Timeline()).installed_at = time.time()
        await self.reporter.status(task, S.DELIVERY_STATE_INSTALLED)
        self._gc()

    def _gc(self) -> None:
        """Drop blobs no kept version references (the real agent's `BundleStore.gc`)."""
        keep = {d for versions in self._manifests.values() for blobs in versions for d in blobs}
        self.sink.cache &= keep

    def carry_over(self, old: SimAgent) -> None:
        """Take what `old` (the same device before a restart) kept on disk: credential, installs, blobs."""
        self.state.device_id, self.state.credential = old.state.device_id, old.state.credential
        self.client.credential = old.client.credential
        self.installed = dict(old.installed)
        self._manifests = {r: list(v) for r, v in old._manifests.items()}
        self.sink.cache = set(old.sink.cache)
        self.timelines = old.timelines
        self.errors, self.error_codes = old.errors, old.error_codes


def _holds(current: tuple[int, str] | None, task: pb.DesiredTask) -> bool:
    """Whether an install `current` (version, digest) satisfies `task`: its version or later; a rollback: exactly."""
    if current is None:
        return False
    return current[0] == task.version if task.rollback else current[0] >= task.version


# ---------------------------------------------------------------- worker processes


class Batch:
    """The agents of one worker process, and the answers to the benchmark's commands."""

    def __init__(self) -> None:
        self.agents: list[SimAgent] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[grpc.aio.Channel] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.own_channel: dict[int, grpc.aio.Channel] = {}  # agent index -> its channel, when not shared
        self.settings: dict[str, Any] = {}
        self.restarts = 0

    def start(
        self,
        *,
        target: str,
        bootstrap_token: str,
        agents: Sequence[tuple[str, Mapping[str, str]]],
        mode: str = "push",
        poll_s: float = 30.0,
        full_pull: bool = False,
        http: bool = False,
        share: int = 1,
        ramp_s: float = 0.0,
        root_pem: bytes | None = None,
    ) -> None:
        channel: grpc.aio.Channel | None = None
        if http and self.ssl_context is None:
            import httpx  # noqa: F401  (loaded now, not in the first install's timeline)

            self.ssl_context = httpfetch.tls_context(httpfetch.HttpSettings())  # ~20 ms each: once, not per agent
        for i, (device_id, attributes) in enumerate(agents):
            if channel is None or i % max(1, share) == 0:
                channel = new_channel(target, root_pem=root_pem)  # `share` agents use this one connection
                self.channels.append(channel)
            self.settings = dict(
                bootstrap_token=bootstrap_token, mode=mode, poll_s=poll_s, full_pull=full_pull, http=http
            )
            self.settings.update(target=target, root_pem=root_pem)
            agent = SimAgent(
                channel=channel,
                device_id=device_id,
                attributes=attributes,
                bootstrap_token=bootstrap_token,
                mode=mode,
                poll_s=poll_s,
                full_pull=full_pull,
                http=http,
                ssl_context=self.ssl_context,
            )
            if share <= 1:
                self.own_channel[len(self.agents)] = channel
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
            # Blobs fetched by URL, and URLs that failed (each fell back to PullBlobs).
            "http_fetched": sum(a.puller.http.fetched for a in self.agents if a.puller.http is not None),
            "http_failures": sum(a.puller.http.failures for a in self.agents if a.puller.http is not None),
            "crashed": sum(1 for t in self.tasks if t.done() and not t.cancelled() and t.exception() is not None),
            "cpu_s": sum(os.times()[:2]),  # this worker process: where the simulator, not the server, is busy
        }

    async def churn(self, *, fraction: float, seed: int, down_s: tuple[float, float] = (1.0, 3.0)) -> int:
        """Restart `fraction` of the agents (seeded pick): each drops its connection as a killed app does, stays
        down for a while, and comes back on a new connection with what it kept (`SimAgent.carry_over`)."""
        rng = random.Random(seed)
        picks = rng.sample(range(len(self.agents)), round(fraction * len(self.agents)))
        for i in picks:
            old, task = self.agents[i], self.tasks[i]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            channel = new_channel(self.settings["target"], root_pem=self.settings["root_pem"])
            if (gone := self.own_channel.pop(i, None)) is not None:
                with contextlib.suppress(ValueError):
                    self.channels.remove(gone)
                with contextlib.suppress(Exception):
                    await gone.close(None)
            self.own_channel[i] = channel
            self.channels.append(channel)
            agent = SimAgent(
                channel=channel,
                device_id=old.device_id,
                attributes=old.attributes,
                ssl_context=self.ssl_context,
                **{k: v for k, v in self.settings.items() if k not in ("target", "root_pem")},
            )
            agent.carry_over(old)
            self.agents[i] = agent
            self.tasks[i] = asyncio.create_task(_delayed(agent.run(), rng.uniform(*down_s)))
        self.restarts += len(picks)
        return len(picks)

    def holdings(self, release: str) -> dict[str, int]:
        """Device id -> the version of `release` it holds (0: none)."""
        return {a.device_id: a.installed.get(release, (0, ""))[0] for a in self.agents}

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
    status, collect (release, version), churn (fraction, seed), holdings (release),
    stop, exit. Every command gets one reply.
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
                elif cmd == "churn":
                    conn.send({"restarted": await batch.churn(fraction=msg["fraction"], seed=msg["seed"])})
                elif cmd == "holdings":
                    conn.send({"holdings": batch.holdings(msg["release"])})
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
