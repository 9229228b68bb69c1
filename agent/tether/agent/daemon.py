"""The edge agent: enrol, hold the push stream, pull, install, run, upload.

One `Agent` per device. It enrols once (the credential is kept in
`state.json`), then holds the `Subscribe` stream, reconnecting with jittered
exponential backoff. The stream opens with a `Sync` of the desired state, so
an agent that was offline catches up; `Notify` and `Revoke` adjust it.

Each release has its own asyncio task (`_release_loop`) that converges the
device on the desired version: fetch and verify the manifest (sha256 of its
bytes must equal the announced digest; Ed25519 signature when trusted keys are
configured), pull only missing blobs (resuming partial downloads, each blob
digest-checked), install atomically, run on the trigger, upload. A tampered
manifest or blob is refused (`REFUSED`), never run, and not retried until the
release announces a different version. A failing task, a bad bundle or a lost
connection affects only its own release; the agent keeps going.

Exactly-once-ish uploads: before a run starts, a run record with an
idempotency key is written to `state.json`; the finished result is stored
under that key before uploading. After a crash the agent re-runs (status
`running`) or re-uploads (status `uploading`) with the same key, and the
controller stores it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from tether.agent import client as client_mod
from tether.agent import engine, results, runtime, store
from tether.common import errors, manifest
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

S = pb.DeliveryState
# Errors after which retrying the same request cannot help.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
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


@dataclasses.dataclass(frozen=True)
class Trigger:
    """When a task runs: once per installed version, or every `interval_s` seconds."""

    type: str = "onInstall"
    interval_s: float = 0.0

    @classmethod
    def from_json(cls, text: str) -> Trigger:
        if not text:
            return cls()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise errors.InvalidSpec(f"not JSON: {e}", field="trigger") from None
        if not isinstance(doc, dict):
            raise errors.InvalidSpec("must be an object", field="trigger")
        kind = doc.get("type", "onInstall")
        if kind == "onInstall":
            return cls()
        if kind == "interval":
            seconds = doc.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 1 <= seconds <= 366 * 86400:
                raise errors.InvalidSpec("interval seconds must be a number in [1, 31622400]", field="trigger")
            return cls("interval", float(seconds))
        raise errors.InvalidSpec(f"type {kind!r} is not supported by this agent", field="trigger")


def _optional_json(task: pb.DesiredTask, field: str) -> str:
    """A JSON-string field the wire contract may gain on DesiredTask (trigger_json, resources_json)."""
    try:
        value = getattr(task, field)
    except AttributeError:
        return ""
    return value if isinstance(value, str) else ""


def _state_name(state: int) -> str:
    return S.Name(state).removeprefix("DELIVERY_STATE_")


class Agent:
    """A device agent. `await agent.run()` until `agent.stop()` (or cancellation)."""

    def __init__(
        self,
        *,
        controller: str,
        state_dir: str | os.PathLike[str],
        data_dir: str | os.PathLike[str],
        bootstrap_token: str = "",
        device_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
        backends: list[str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        task_slots: asyncio.Semaphore | None = None,
        limits: runtime.TaskLimits = runtime.TaskLimits(),
        threads: int = 1,
        trusted_keys: Mapping[str, bytes] | None = None,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.state_dir = pathlib.Path(state_dir)
        self.data_dir = pathlib.Path(data_dir)
        self.bootstrap_token = bootstrap_token
        self.attributes = dict(attributes or {})
        self.backends = backends
        self.limits = limits
        self.threads = threads
        self.trusted_keys = dict(trusted_keys) if trusted_keys is not None else None
        self.backoff = backoff
        self.clock = clock
        self._rng = rng or random.Random()
        self._requested_device_id = device_id
        self._channel_credentials = channel_credentials
        self._slots = task_slots
        self.store = store.BundleStore(self.state_dir)
        self._state_file = store.StateFile(self.state_dir / "state.json")
        self.state = self._state_file.load()
        self._client: client_mod.DeviceClient | None = None
        self._desired: dict[str, pb.DesiredTask] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._blob_locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, set[str]] = {}  # release -> digests of an install in progress
        self._store_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()  # set while the Subscribe stream is open
        self.synced = asyncio.Event()  # set once the first Sync was handled

    # ------------------------------------------------------------ public
    @property
    def device_id(self) -> str:
        return self.state.device_id or self._requested_device_id or ""

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Enrol if needed, then hold the event stream until `stop()`; always cleans up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._client = client_mod.DeviceClient(
            self.controller, credential=self.state.credential, channel_credentials=self._channel_credentials
        )
        try:
            await self._until_stopped(self._enroll_with_retry())
            if self._stopping.is_set():
                return
            # Resume what was installed before a restart (pending uploads, interval triggers);
            # the stream's opening Sync corrects the desired set.
            for release, installed in self.state.installed.items():
                self._desired.setdefault(
                    release,
                    pb.DesiredTask(
                        release=release, version=installed.version, manifest_digest=installed.manifest_digest
                    ),
                )
                self._kick(release)
            await self._until_stopped(self._stream_forever())
        finally:
            self.connected.clear()
            workers = list(self._workers.values())
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._client.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._save)
            log.info("agent %s stopped", self.device_id)

    # ------------------------------------------------------------ helpers
    async def _until_stopped(self, coro: Any) -> None:
        work = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, stop):
                t.cancel()
            await asyncio.gather(work, stop, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _save(self) -> None:
        self.state.prune_runs()
        self._state_file.save(self.state)

    async def _report(self, task: pb.DesiredTask, state: int, message: str = "") -> None:
        """ReportStatus, best effort: a lost report must not stop the work it reports on."""
        assert self._client is not None
        try:
            await self._client.report_status(release=task.release, version=task.version, state=state, message=message)
        except Exception as e:
            log.debug("report %s %s v%d failed: %s", _state_name(state), task.release, task.version, e)

    # ------------------------------------------------------------ enrolment
    async def _enroll_with_retry(self) -> None:
        attempt = 0
        while not self.state.credential:
            try:
                await self._enroll()
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("enrolment refused: %s (check the bootstrap token)", e.details())
                else:
                    log.warning("enrolment failed: %s %s", e.code().name, e.details())
                await self._sleep(self.backoff.delay(attempt, self._rng))
                attempt += 1

    async def _enroll(self) -> None:
        assert self._client is not None
        if not self.bootstrap_token:
            raise errors.FailedPrecondition("this device is not enrolled and has no bootstrap token")
        if self.backends is None:
            self.backends = await asyncio.to_thread(engine.detect_backends)
        device_id = self.state.device_id or self._requested_device_id or f"dev-{uuid.uuid4().hex[:16]}"
        info = pb.DeviceInfo(device_id=device_id, attributes=self.attributes, backends=self.backends)
        response = await self._client.enroll(bootstrap_token=self.bootstrap_token, device=info)
        self.state.device_id = response.device_id or device_id
        self.state.credential = response.credential
        self._client.credential = response.credential
        await asyncio.to_thread(self._save)
        log.info("enrolled as %s (backends %s)", self.state.device_id, ",".join(self.backends))

    # ------------------------------------------------------------ the stream
    async def _stream_forever(self) -> None:
        assert self._client is not None
        attempt = 0
        while not self._stopping.is_set():
            if not self.state.credential:
                await self._enroll_with_retry()
            installed = [
                pb.DesiredTask(release=r, version=t.version, manifest_digest=t.manifest_digest)
                for r, t in sorted(self.state.installed.items())
            ]
            call = self._client.subscribe(installed)
            try:
                async for event in call:
                    if not self.connected.is_set():
                        attempt = 0
                        self.connected.set()
                    self._on_event(event)
                log.info("controller closed the stream")
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and self.bootstrap_token:
                    log.warning("credential rejected (%s); enrolling again", e.details())
                    self.state.credential = ""
                    await asyncio.to_thread(self._save)
                else:
                    log.info("stream lost: %s %s", e.code().name, e.details())
            finally:
                call.cancel()
                self.connected.clear()
            await self._sleep(self.backoff.delay(attempt, self._rng))
            attempt += 1

    def _on_event(self, event: pb.ServerEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "sync":
            wanted = {t.release: t for t in event.sync.desired}
            for release in set(self._desired) | set(self.state.installed):
                if release not in wanted:
                    self._desired.pop(release, None)
                    self._kick(release)
            for task in wanted.values():
                self._set_desired(task)
            self.synced.set()
        elif kind == "notify":
            self._set_desired(event.notify.task)
        elif kind == "revoke":
            self._desired.pop(event.revoke.release, None)
            self._kick(event.revoke.release)
        elif kind == "heartbeat":
            pass
        else:
            log.debug("ignoring unknown event %r", kind)

    def _set_desired(self, task: pb.DesiredTask) -> None:
        try:
            store.release_dirname(task.release)
            manifest.check_digest(task.manifest_digest)
        except errors.TetherError as e:
            log.warning("ignoring malformed desired task %r: %s", task.release, e)
            return
        current = self._desired.get(task.release)
        if current is not None and current.version > task.version:
            return  # an older announcement arriving late
        self._desired[task.release] = task
        self._kick(task.release)

    def _kick(self, release: str) -> None:
        event = self._kicks.setdefault(release, asyncio.Event())
        event.set()
        worker = self._workers.get(release)
        if worker is None or worker.done():
            self._workers[release] = asyncio.create_task(self._release_loop(release), name=f"release:{release}")

    # ------------------------------------------------------------ one release
    async def _release_loop(self, release: str) -> None:
        kick = self._kicks[release]
        attempt = 0
        while not self._stopping.is_set():
            kick.clear()
            wait: float | None = None
            task = self._desired.get(release)
            try:
                if task is None:
                    if release in self.state.installed or self.store.current(release) is not None:
                        await self._uninstall(release)
                    if release not in self._desired:  # not re-announced while we uninstalled
                        self._workers.pop(release, None)
                        return
                    continue
                await self._flush_uploads(release)
                refused = self.state.refused.get(release)
                if refused and refused.get("version") == task.version:
                    wait = None  # refused versions are not retried; a new version kicks us
                else:
                    installed = self.state.installed.get(release)
                    if installed is None or (installed.version, installed.manifest_digest) != (
                        task.version,
                        task.manifest_digest,
                    ):
                        await self._install(task)
                    wait = await self._maybe_run(task)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except errors.VerificationFailed as e:
                log.error("refused %s v%d: %s", release, task.version if task else 0, e)
                if task is not None:
                    self.state.refused[release] = {
                        "version": task.version,
                        "digest": task.manifest_digest,
                        "reason": str(e)[:500],
                    }
                    await asyncio.to_thread(self._save)
                    await self._report(task, S.DELIVERY_STATE_REFUSED, str(e))
            except Exception as e:
                # Network trouble, a full disk, a bug: retry this release later; others carry on.
                wait = self.backoff.delay(attempt, self._rng)
                attempt += 1
                level = logging.INFO if client_mod.is_retryable(e) else logging.WARNING
                log.log(level, "%s: %s (retrying in %.1fs)", release, _describe(e), wait, exc_info=level > 20)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kick.wait(), timeout=wait)

    # ------------------------------------------------------------ install
    async def _install(self, task: pb.DesiredTask) -> None:
        assert self._client is not None
        await self._report(task, S.DELIVERY_STATE_DOWNLOADING)
        response = await self._client.get_manifest(release=task.release, manifest_digest=task.manifest_digest)
        bundle = self._verify_manifest(task, response)
        self._inflight[task.release] = set(bundle.blob_digests())
        try:
            for entry in self.store.missing_blobs(bundle):
                await self._pull(task.release, entry)
            async with self._store_lock:
                try:
                    await asyncio.to_thread(self.store.install, task.release, task.version, bundle)
                except errors.DigestMismatch as e:
                    raise errors.VerificationFailed(str(e)) from None
                self.state.installed[task.release] = store.InstalledTask(
                    release=task.release, version=task.version, manifest_digest=task.manifest_digest
                )
                self.state.refused.pop(task.release, None)
                await asyncio.to_thread(self._save)
        finally:
            self._inflight.pop(task.release, None)
        log.info("installed %s v%d (%s)", task.release, task.version, task.manifest_digest[:19])
        await self._report(task, S.DELIVERY_STATE_INSTALLED)
        await self._gc()

    def _verify_manifest(self, task: pb.DesiredTask, response: pb.GetManifestResponse) -> manifest.Manifest:
        data = response.manifest
        if manifest.sha256_digest(data) != task.manifest_digest:
            raise errors.VerificationFailed(
                f"manifest hashes to {manifest.sha256_digest(data)}, announced {task.manifest_digest}"
            )
        if self.trusted_keys is not None:
            _verify_signature(data, response.signature, response.key_id, self.trusted_keys)
        try:
            bundle = manifest.Manifest.from_bytes(data)
        except errors.InvalidManifest as e:
            raise errors.VerificationFailed(f"invalid manifest: {e}") from None
        for need in bundle.engines:
            if need.engine not in {b.split("/", 1)[0] for b in self.backends or []} and self.backends:
                raise errors.VerificationFailed(f"bundle needs engine {need.engine!r}; this device has {self.backends}")
        return bundle

    async def _pull(self, release: str, entry: manifest.FileEntry) -> None:
        assert self._client is not None
        lock = self._blob_locks.setdefault(entry.sha256, asyncio.Lock())
        async with lock:
            if self.store.has_blob(entry.sha256):
                return
            writer = self.store.open_blob(entry.sha256, expected_size=entry.size)
            try:
                async for chunk in self._client.pull_blob(release=release, digest=entry.sha256, offset=writer.offset):
                    if chunk.total_size and chunk.total_size != entry.size:
                        raise errors.DigestMismatch(
                            f"blob {entry.sha256} is {chunk.total_size} bytes; the manifest says {entry.size}"
                        )
                    writer.write(chunk.data, offset=chunk.offset)
            except errors.DigestMismatch as e:
                writer.close()
                self.store.partial_path(entry.sha256).unlink(missing_ok=True)
                raise errors.VerificationFailed(str(e)) from None
            except grpc.aio.AioRpcError as e:
                writer.close()  # keep the partial: the next attempt resumes from its size
                if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                    self.store.partial_path(entry.sha256).unlink(missing_ok=True)
                raise
            except BaseException:
                writer.close()
                raise
            try:
                await asyncio.to_thread(writer.commit)
            except errors.DigestMismatch as e:
                raise errors.VerificationFailed(str(e)) from None

    async def _gc(self) -> None:
        keep = set().union(*self._inflight.values()) if self._inflight else set()
        async with self._store_lock:
            removed = await asyncio.to_thread(self.store.gc, keep=keep)
        if removed:
            log.debug("gc removed %d blobs", len(removed))

    async def _uninstall(self, release: str) -> None:
        installed = self.state.installed.get(release)
        async with self._store_lock:
            await asyncio.to_thread(self.store.uninstall, release)
            self.state.installed.pop(release, None)
            self.state.refused.pop(release, None)
            for record in self.state.runs_of(release):
                if record.status in {"running", "uploading"}:
                    record.status, record.message = "failed", "revoked before upload"
                    self.store.result_path(record.key).unlink(missing_ok=True)
            await asyncio.to_thread(self._save)
        log.info("uninstalled %s", release)
        if installed is not None:
            task = pb.DesiredTask(release=release, version=installed.version)
            await self._report(task, S.DELIVERY_STATE_UNINSTALLED)
        await self._gc()

    # ------------------------------------------------------------ runs
    async def _maybe_run(self, task: pb.DesiredTask) -> float | None:
        """Run when the trigger says so. Returns seconds until the next check (None: only when kicked)."""
        try:
            trigger = Trigger.from_json(_optional_json(task, "trigger_json"))
        except errors.InvalidSpec as e:
            raise errors.VerificationFailed(str(e)) from None
        runs = self.state.runs_of(task.release, task.version)
        interrupted = [r for r in runs if r.status == "running"]
        if interrupted:  # the agent stopped mid-run: run again under the same idempotency key
            await self._run(task, trigger, key=interrupted[0].key)
            return self._next_check(task, trigger)
        if trigger.type == "onInstall":
            if not any(r.trigger == "onInstall" for r in runs):
                await self._run(task, trigger)
            return None
        due = self._next_check(task, trigger)
        if due is not None and due <= 0:
            await self._run(task, trigger)
            return self._next_check(task, trigger)
        return due

    def _next_check(self, task: pb.DesiredTask, trigger: Trigger) -> float | None:
        if trigger.type != "interval":
            return None
        runs = self.state.runs_of(task.release, task.version)
        if not runs:
            return 0.0
        last = max(r.started_at for r in runs)
        return max(0.0, last + trigger.interval_s - self.clock())

    async def _run(self, task: pb.DesiredTask, trigger: Trigger, *, key: str | None = None) -> None:
        release, version = task.release, task.version
        bundle_dir = self.store.current_dir(release)
        if bundle_dir is None or self.store.current(release) != version:
            raise errors.FailedPrecondition(f"{release} v{version} is not installed")
        bundle = self.store.installed_manifest(release, version)
        limits = runtime.TaskLimits.from_json(
            _json_or_none(_optional_json(task, "resources_json")), default=self.limits
        )
        key = key or f"{self.device_id}:{release}:{version}:{uuid.uuid4().hex}"
        record = self.state.runs.get(key) or store.RunRecord(
            key=key, release=release, version=version, trigger=trigger.type, status="running", started_at=0.0
        )
        async with self._slots or contextlib.nullcontext():
            record.status, record.started_at = "running", self.clock()
            self.state.runs[key] = record
            await asyncio.to_thread(self._save)  # intent first: a restart reuses this key
            await self._report(task, S.DELIVERY_STATE_RUNNING)
            try:
                outcome = await runtime.run_task(
                    bundle_dir=bundle_dir,
                    bundle=bundle,
                    data_dir=self.data_dir,
                    state=self.store.load_task_state(release),
                    limits=limits,
                    threads=self.threads,
                    work_dir=self.state_dir,
                )
            except errors.TaskFailed as e:
                record.status, record.finished_at, record.message = "failed", self.clock(), str(e)[:2000]
                await asyncio.to_thread(self._save)
                log.warning("%s v%d failed: %s", release, version, str(e).splitlines()[0] if str(e) else e)
                await self._report(task, S.DELIVERY_STATE_FAILED, str(e))
                return
        for line in outcome.logs:
            log.info("[%s] %s", release, line)
        request = results.to_upload_request(
            outcome.result, release=release, version=version, idempotency_key=key, duration_s=outcome.duration_s
        )

        def persist() -> None:
            store.atomic_write(self.store.result_path(key), request.SerializeToString())
            self.store.save_task_state(release, outcome.state)
            record.status, record.finished_at = "uploading", self.clock()
            record.message = outcome.backend
            self._save()

        await asyncio.to_thread(persist)
        await self._upload(task, record)

    async def _flush_uploads(self, release: str) -> None:
        for record in self.state.runs_of(release):
            if record.status == "uploading":
                task = pb.DesiredTask(release=record.release, version=record.version)
                await self._upload(task, record)
            elif record.status == "running" and (
                release not in self._desired or record.version != self._desired[release].version
            ):
                record.status, record.message = "failed", "superseded by a newer version before it finished"
                await asyncio.to_thread(self._save)

    async def _upload(self, task: pb.DesiredTask, record: store.RunRecord) -> None:
        assert self._client is not None
        path = self.store.result_path(record.key)
        try:
            request = pb.UploadResultRequest.FromString(await asyncio.to_thread(path.read_bytes))
        except (OSError, ValueError) as e:
            record.status, record.message = "failed", f"stored result unreadable: {e}"
            await asyncio.to_thread(self._save)
            await self._report(task, S.DELIVERY_STATE_FAILED, record.message)
            return
        try:
            response = await self._client.upload_result(request)
        except grpc.aio.AioRpcError as e:
            if e.code() not in _PERMANENT:
                raise  # kept as "uploading": retried with the same key
            record.status, record.message = "failed", f"upload refused: {e.code().name} {e.details()}"
            path.unlink(missing_ok=True)
            await asyncio.to_thread(self._save)
            await self._report(task, S.DELIVERY_STATE_FAILED, record.message)
            return
        record.status = "uploaded"
        path.unlink(missing_ok=True)
        await asyncio.to_thread(self._save)
        log.info(
            "uploaded %s v%d (%d samples%s)",
            task.release,
            task.version,
            request.sample_count,
            ", duplicate" if response.duplicate else "",
        )
        await self._report(task, S.DELIVERY_STATE_SUCCEEDED)


def _json_or_none(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _verify_signature(data: bytes, signature: bytes, key_id: str, trusted: Mapping[str, bytes]) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signature:
        raise errors.VerificationFailed("manifest is unsigned and this agent only runs signed bundles")
    raw = trusted.get(key_id)
    if raw is None:
        raise errors.VerificationFailed(f"manifest is signed by untrusted key {key_id!r}")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise errors.VerificationFailed(f"manifest signature by {key_id!r} does not verify") from None


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
