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
release announces a different version.

Each desired task carries its release's policy (`trigger_json`,
`resources_json`). The trigger decides when it runs; the resources are its
per-run limits, each capped by the agent's own limits (its `--task-*` flags,
the device's caps), which are also the limits when the release sets none. A
policy this agent cannot honour (malformed JSON, unknown trigger type or
resource key, value out of bounds) refuses that version before anything is
downloaded, like a tampered bundle. A failing task, a bad bundle or a lost
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from tether.agent import backends as backends_mod
from tether.agent import client as client_mod
from tether.agent import engine, participation, renewal, results, runtime, schedule, store
from tether.agent.stream import eventstore as event_store
from tether.agent.stream import processor as stream_processor
from tether.agent.stream import server as stream_server
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


Backoff = client_mod.Backoff  # reconnects, enrolment and install retries


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Blocked:
    """A version refused for the disk budget, and when the store was last measured for it."""

    version: int
    digest: str
    bundle: manifest.Manifest | None  # its manifest, so a retry plans again without fetching it
    refusal: store.DiskBudgetExceeded
    gcs: int  # Agent._gcs when measured
    checked_at: float  # monotonic


# A version refused for the disk budget is tried again at least this often (space may free up meanwhile).
OVER_BUDGET_RECHECK_S = 60.0

# When a task runs (onInstall, interval, cron, onDemand, pattern): parsed and timed in tether.agent.schedule.
Trigger = schedule.Trigger


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one desired task runs: its trigger and the limits of each run."""

    trigger: Trigger
    limits: runtime.TaskLimits

    @classmethod
    def of(cls, task: pb.DesiredTask, *, caps: runtime.TaskLimits) -> Policy:
        """The task's policy within the device caps; InvalidSpec (naming the field) when it is malformed."""
        return cls(
            trigger=Trigger.from_json(task.trigger_json),
            limits=runtime.TaskLimits.from_wire(task.resources_json, caps=caps),
        )


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
        device_state: participation.StateProbe | None = None,
        backend_selection: bool = True,
        selector: backends_mod.Selector | None = None,
        events_socket: str | os.PathLike[str] | None = None,
        event_retention: tuple[int, float] = (event_store.DEFAULT_MAX_EVENTS, event_store.DEFAULT_MAX_AGE_S),
        disk_budget: int | None = store.DEFAULT_DISK_BUDGET,
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
        self.device_state = device_state or participation.default_probe  # charging / unmetered / idle
        self._rng = rng or random.Random()
        self._requested_device_id = device_id
        self._channel_credentials = channel_credentials
        self._slots = task_slots
        self.store = store.BundleStore(self.state_dir)
        self._state_file = store.StateFile(self.state_dir / "state.json")
        self.state = self._state_file.load()
        # Backend selection (tether.agent.backends): per model, before a version goes live. A simulated
        # fleet passes one shared selector; `backend_selection=False` runs every model as its bundle says.
        self.selector: backends_mod.Selector | None = None
        if backend_selection:
            self.selector = selector or backends_mod.Selector(
                cache_path=self.state_dir / backends_mod.CACHE_FILE, backends=backends, memory_mb=limits.memory_mb
            )
        self._backends_dirty = True  # choices the controller has not heard of yet
        self._backends_report: asyncio.Task[None] | None = None
        self._client: client_mod.DeviceClient | None = None
        self._desired: dict[str, pb.DesiredTask] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Blobs being fetched right now, each by one install (blobs are shared between releases): set when done.
        self._blob_claims: dict[str, asyncio.Event] = {}
        self._pull_blobs_ok = True  # False after the controller answered PullBlobs with UNIMPLEMENTED
        self._inflight: dict[str, set[str]] = {}  # release -> digests of an install in progress
        self._notified = client_mod.NotifyExtras(self._rng)  # manifests and pull moments Notifies carried
        # Disk budget of the bundle store (bytes; None: unlimited), enforced before each pull (`_make_room`).
        self.disk_budget = disk_budget
        self._reserved: dict[str, dict[str, int]] = {}  # release -> digest -> declared size, of a pull under way
        # release -> (version, manifest digest, manifest) of a version refused for the disk budget
        self._over_budget: dict[str, _Blocked] = {}  # release -> its version refused for the disk budget
        self._gcs = 0  # garbage collections so far: the store changes only through installs and uninstalls
        self._store_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()  # set while the Subscribe stream is open
        self.synced = asyncio.Event()  # set once the first Sync was handled
        # On-device stream processing: events (local socket or `self.stream.ingest`) -> bounded store ->
        # pattern triggers; `events_socket` None means no socket (events can still be fed in-process).
        max_events, max_age_s = event_retention
        self.stream = stream_processor.StreamProcessor(
            event_store.EventStore(
                self.state_dir / "events.db", max_events=max_events, max_age_s=max_age_s, clock=clock
            ),
            clock=clock,
        )
        self.dispatch = schedule.Dispatcher(self.stream, clock=clock, kick=self._kick)
        self._events_socket = events_socket
        self._event_server: stream_server.EventServer | None = None

    # ------------------------------------------------------------ public
    @property
    def device_id(self) -> str:
        return self.state.device_id or self._requested_device_id or ""

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Enrol if needed, then hold the event stream until `stop()`; always cleans up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        usage = await asyncio.to_thread(self.store.snapshot)
        log.info("bundle store %s: %s", self.state_dir, usage.describe(self.disk_budget))
        self._client = client_mod.DeviceClient(
            self.controller, credential=self.state.credential, channel_credentials=self._channel_credentials
        )
        try:
            if self._events_socket is not None:  # apps may report events before the device is enrolled
                self._event_server = stream_server.EventServer(self.stream, self._events_socket)
                await self._event_server.start()
            await self._until_stopped(self._enroll_with_retry())
            if self._stopping.is_set():
                return
            # Resume what was installed before a restart (pending uploads, interval triggers);
            # the stream's opening Sync corrects the desired set.
            for release, installed in self.state.installed.items():
                self._desired.setdefault(
                    release,
                    pb.DesiredTask(
                        release=release,
                        version=installed.version,
                        manifest_digest=installed.manifest_digest,
                        trigger_json=installed.trigger_json,
                        resources_json=installed.resources_json,
                    ),
                )
                self._kick(release)
            # The credential expires: renew it while the stream runs (tether.agent.renewal).
            await self._until_stopped(renewal.alongside(self, self._stream_forever()))
        finally:
            self.connected.clear()
            workers = list(self._workers.values())
            if self._backends_report is not None:
                workers.append(self._backends_report)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._event_server is not None:
                with contextlib.suppress(Exception):
                    await self._event_server.stop()
                self._event_server = None
            self.stream.store.close()
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
            await self._client.report_status(
                release=task.release,
                version=task.version,
                state=state,
                message=message,
                device_state=self._device_state(),
            )
        except Exception as e:
            log.debug("report %s %s v%d failed: %s", _state_name(state), task.release, task.version, e)

    # ------------------------------------------------------------ enrolment
    async def _enroll_with_retry(self) -> None:
        attempt = 0
        # Also checks stopping: grpc.aio can swallow a cancel, and once stopping `_sleep` returns at once.
        while not self.state.credential and not self._stopping.is_set():
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
                        self._pull_blobs_ok = True  # maybe a newer controller now: try PullBlobs again
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
            self._report_backends_soon()
        elif kind == "notify":
            notify = event.notify
            self._notified.heard(notify, now=time.monotonic())  # its manifest and pull moment, for _install
            self._set_desired(notify.task)
        elif kind == "revoke":
            self._desired.pop(event.revoke.release, None)
            self._notified.forget(event.revoke.release)
            self._kick(event.revoke.release)
        elif kind == "heartbeat":
            pass
        elif kind == "run":
            self._on_run_now(event.run)
        else:
            log.debug("ignoring unknown event %r", kind)

    def _on_run_now(self, run: pb.RunNow) -> None:
        """On-demand trigger: queue a run of an installed (or being installed) release."""
        if run.release not in self._desired:
            log.info("ignoring RunNow for %r: not installed here", run.release)
            return
        why = self.dispatch.on_demand(
            release=run.release, version=run.version, request_id=run.request_id[:64], payload_json=run.payload_json
        )
        if why is not None:
            log.warning("ignoring RunNow for %r: %s", run.release, why)

    def _set_desired(self, task: pb.DesiredTask) -> None:
        try:
            store.release_dirname(task.release)
            manifest.check_digest(task.manifest_digest)
        except errors.TetherError as e:
            log.warning("ignoring malformed desired task %r: %s", task.release, e)
            return
        current = self._desired.get(task.release)
        if current is not None and current.version > task.version and not task.rollback:
            return  # an older announcement arriving late (a rollback to it is not late: it is meant)
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
                    # Before downloading anything: a policy this agent cannot honour refuses the version.
                    policy = self._policy(task)
                    installed = self.state.installed.get(release)
                    if installed is None or (installed.version, installed.manifest_digest) != (
                        task.version,
                        task.manifest_digest,
                    ):
                        await self._still_over_budget(task)  # a version refused for space: only once it fits
                        delay = self._notified.pull_delay(release, now=time.monotonic())
                        if delay > 0 and self._kept(task) is None:  # Notify.pull_spread_ms: its turn comes later
                            log.debug("%s v%d: pulls in %.2fs (controller's spread)", release, task.version, delay)
                            await self._sleep(delay)
                            continue  # then as desired by then
                        await self._install(task)
                        self._over_budget.pop(release, None)
                    wait = await self._maybe_run(task, policy)
                attempt = 0
                self._over_budget.pop(release, None)
            except asyncio.CancelledError:
                raise
            except store.DiskBudgetExceeded as e:
                wait = await self._over_budget_wait(task, e) if task is not None else None
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

    def _policy(self, task: pb.DesiredTask) -> Policy:
        try:
            return Policy.of(task, caps=self.limits)
        except errors.InvalidSpec as e:
            raise errors.VerificationFailed(f"release policy not usable by this agent: {e}") from None

    # ------------------------------------------------------------ install
    async def _install(self, task: pb.DesiredTask) -> None:
        assert self._client is not None
        bundle = self._kept(task)
        response = self._notified.manifest(task.manifest_digest)  # from the Notify, if it carried it
        progress = None
        if bundle is None:
            progress = client_mod.LateReport(lambda: self._report(task, S.DELIVERY_STATE_DOWNLOADING))
            try:
                if response is None:
                    response = await self._client.get_manifest(
                        release=task.release, manifest_digest=task.manifest_digest
                    )
                bundle = self._verify_manifest(task, response)
            except BaseException:
                await progress.settle()
                raise
        self._inflight[task.release] = set(bundle.blob_digests())
        try:
            await self._make_room(task, bundle)  # the disk budget: free space, or refuse before any download
            await self._pull_missing(task.release, self.store.missing_blobs(bundle))
            await self._select_backends(bundle)  # a model that runs nowhere refuses the version here
            async with self._store_lock:
                try:
                    await asyncio.to_thread(self.store.install, task.release, task.version, bundle)
                except errors.DigestMismatch as e:
                    raise errors.VerificationFailed(str(e)) from None
                self.state.installed[task.release] = store.InstalledTask(
                    release=task.release,
                    version=task.version,
                    manifest_digest=task.manifest_digest,
                    trigger_json=task.trigger_json,
                    resources_json=task.resources_json,
                )
                self.state.refused.pop(task.release, None)
                await asyncio.to_thread(self._save)
        finally:
            self._inflight.pop(task.release, None)
            if progress is not None:
                await progress.settle()
        log.info("installed %s v%d (%s)", task.release, task.version, task.manifest_digest[:19])
        await self._report(task, S.DELIVERY_STATE_INSTALLED)
        self._backends_dirty = True
        self._report_backends_soon()
        await self._gc()

    # ------------------------------------------------------------ backend selection
    async def _select_backends(self, bundle: manifest.Manifest) -> None:
        """Choose how each model runs here (cached per model and device), before the version goes live.

        A model no candidate can load or run raises ModelUnusable (a
        VerificationFailed: the version is refused with the engines' errors and
        nothing is installed). Selection that cannot finish (its process crashed
        or overran) is not the bundle's fault: the models then run as declared.
        """
        if self.selector is None or not bundle.engines:
            return
        specs = backends_mod.specs_for(bundle, path_of=lambda f: self.store.blob_path(f.sha256))
        try:
            chosen = await self.selector.select(specs, work_dir=self.state_dir)
        except backends_mod.ModelUnusable:
            raise
        except errors.TetherError as e:
            log.warning("backend selection for %s did not finish (%s); running models as declared", bundle.name, e)
            return
        for name, sel in sorted(chosen.items()):
            log.info("%s: %s runs on %s (%.3f ms)", bundle.name, name, sel.chosen.key, sel.latency_ms)

    async def _backend_choices(self, bundle: manifest.Manifest) -> dict[str, Any]:
        if self.selector is None:
            return {}
        await self.selector.profile()
        return self.selector.choices(bundle)

    def _report_backends_soon(self) -> None:
        """Tell the controller the current choices (best effort, in the background, one report at a time)."""
        if self.selector is None or self._client is None or not self._backends_dirty:
            return
        if self._backends_report is not None and not self._backends_report.done():
            return  # the running report re-checks the dirty flag when it finishes
        self._backends_report = asyncio.create_task(self._report_backends(), name="report-backends")

    async def _report_backends(self) -> None:
        assert self.selector is not None and self._client is not None
        while self._backends_dirty and not self._stopping.is_set():
            self._backends_dirty = False
            try:
                device_profile = await self.selector.profile()
                choices: dict[str, pb.BackendChoice] = {}
                for release, installed in sorted(self.state.installed.items()):
                    try:
                        bundle = self.store.installed_manifest(release, installed.version)
                    except (OSError, errors.TetherError):
                        continue
                    for spec in backends_mod.specs_for(bundle, path_of=lambda f: f.path):
                        sel = self.selector.cache.get(spec.key, device_profile.fingerprint)
                        if sel is not None and spec.key not in choices:
                            choices[spec.key] = pb.BackendChoice(
                                model_key=spec.key,
                                candidate=sel.chosen.key,
                                latency_ms=sel.latency_ms,
                                release=release,
                                model=spec.name,
                            )
                if not choices:
                    continue  # nothing to tell (yet): an install finishing meanwhile sets the flag again
                await self._client.report_backends(
                    pb.ReportBackendsRequest(
                        choices=list(choices.values())[:64],
                        fingerprint=device_profile.fingerprint,
                        backends=list(device_profile.backends),
                    )
                )
            except Exception as e:  # an older controller (UNIMPLEMENTED), a lost connection: next sync retries
                self._backends_dirty = True
                log.debug("reporting backend choices failed: %s", _describe(e))
                return

    def _kept(self, task: pb.DesiredTask) -> manifest.Manifest | None:
        """The manifest of a kept install of exactly this version (a rollback switches back without downloading).

        It was verified (digest, signature) when first installed; its digest must still be the announced one.
        """
        if task.version not in self.store.versions(task.release):
            return None
        try:
            kept = self.store.installed_manifest(task.release, task.version)
        except (OSError, errors.TetherError):
            return None
        return kept if kept.digest == task.manifest_digest else None

    def _device_state(self) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in self.device_state().items() if k in participation.KEYS}
        except Exception as e:  # a probe must never stop the agent
            log.debug("device state probe failed: %s", e)
            return {}

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

    async def _pull_missing(self, release: str, entries: Sequence[manifest.FileEntry]) -> None:
        """Fetch these blobs: one PullBlobs stream for all of them (blob by blob from an older controller).

        Blobs are shared between releases: one another install is fetching right now is left to it and
        waited for, and fetched here after all if that install did not get it.
        """
        pending = list(entries)
        while pending:
            mine = [e for e in pending if e.sha256 not in self._blob_claims]
            if not mine:  # every one is being fetched by other installs: wait for one, then look again
                await self._blob_claims[pending[0].sha256].wait()
            else:
                for e in mine:
                    self._blob_claims[e.sha256] = asyncio.Event()
                try:
                    await self._fetch(release, [e for e in mine if not self.store.has_blob(e.sha256)])
                finally:
                    for e in mine:
                        self._blob_claims.pop(e.sha256).set()
            pending = [e for e in pending if not self.store.has_blob(e.sha256)]

    async def _fetch(self, release: str, entries: Sequence[manifest.FileEntry]) -> None:
        """Store every one of these blobs (claimed by this install), verified, or raise."""
        for start in range(0, len(entries), manifest.MAX_BLOBS_PER_PULL):
            group = entries[start : start + manifest.MAX_BLOBS_PER_PULL]
            if self._pull_blobs_ok:
                try:
                    await self._pull_group(release, group)
                    continue
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._pull_blobs_ok = False
                    log.info("the controller has no PullBlobs (an older version): pulling blob by blob")
            for entry in group:
                if not self.store.has_blob(entry.sha256):
                    await self._pull(release, entry)

    def _held(self, entries: Sequence[manifest.FileEntry]) -> int:
        """Bytes of these blobs on disk, whole or partial: grows with every chunk received."""
        return sum(e.size if self.store.has_blob(e.sha256) else self.store.partial_size(e.sha256) for e in entries)

    async def _pull_group(self, release: str, group: Sequence[manifest.FileEntry]) -> None:
        """One PullBlobs stream for the group, resumed at once after a break that made progress.

        The next call asks for what is still missing, each blob from the offset it reached; a break
        without progress goes back to the release's backoff.
        """
        while missing := [e for e in group if not self.store.has_blob(e.sha256)]:
            held = self._held(missing)
            try:
                await self._pull_stream(release, missing)
            except grpc.aio.AioRpcError as e:
                if not client_mod.is_retryable(e) or self._held(missing) <= held:
                    raise
                log.info("%s: blob stream broke (%s); resuming from the offsets reached", release, _describe(e))

    async def _pull_stream(self, release: str, entries: Sequence[manifest.FileEntry]) -> None:
        """One PullBlobs call: each blob from its partial's size into its partial, verified as it completes."""
        assert self._client is not None
        order = [(e.sha256, _resume_offset(self.store.partial_size(e.sha256), e.size)) for e in entries]
        sizes = {e.sha256: e.size for e in entries}
        index = 0  # the blob expected next
        writer: store.BlobWriter | None = None
        try:
            async for chunk in self._client.pull_blobs(release=release, blobs=order):
                if writer is None:
                    if index >= len(order) or chunk.digest != order[index][0]:
                        expected = order[index][0] if index < len(order) else "nothing more"
                        raise errors.FailedPrecondition(f"PullBlobs sent {chunk.digest!r}, expected {expected}")
                    writer = self.store.open_blob(chunk.digest, expected_size=sizes[chunk.digest])
                    index += 1
                elif chunk.digest != writer.digest:
                    raise errors.FailedPrecondition(
                        f"PullBlobs moved on to {chunk.digest!r} with blob {writer.digest} at {writer.offset}"
                        f" of {writer.expected_size} bytes"
                    )
                _write_chunk(writer, chunk)
                if writer.offset == writer.expected_size:
                    done, writer = writer, None
                    await self._commit(done)
        except errors.DigestMismatch as e:
            if writer is not None:
                self._discard(writer)
            raise errors.VerificationFailed(str(e)) from None
        except BaseException:
            if writer is not None:
                writer.close()  # keep the partial: the next attempt resumes from its size
            raise
        if writer is not None or index < len(order):
            if writer is not None:
                writer.close()
            raise errors.FailedPrecondition(f"PullBlobs ended after {index} of {len(order)} blobs, the last unfinished")

    def _discard(self, writer: store.BlobWriter) -> None:
        """A blob that cannot be the one the manifest names: its partial goes, the next attempt starts over."""
        writer.close()
        self.store.partial_path(writer.digest).unlink(missing_ok=True)

    async def _commit(self, writer: store.BlobWriter) -> None:
        try:
            await asyncio.to_thread(writer.commit)
        except errors.DigestMismatch as e:
            raise errors.VerificationFailed(str(e)) from None

    async def _pull(self, release: str, entry: manifest.FileEntry) -> None:
        """One blob with PullBlob (a controller without PullBlobs); the caller has claimed it."""
        assert self._client is not None
        if self.store.has_blob(entry.sha256):
            return
        writer = self.store.open_blob(entry.sha256, expected_size=entry.size)
        try:
            async for chunk in self._client.pull_blob(release=release, digest=entry.sha256, offset=writer.offset):
                _write_chunk(writer, chunk)
        except errors.DigestMismatch as e:
            self._discard(writer)
            raise errors.VerificationFailed(str(e)) from None
        except grpc.aio.AioRpcError as e:
            writer.close()  # keep the partial: the next attempt resumes from its size
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                self.store.partial_path(entry.sha256).unlink(missing_ok=True)
            raise
        except BaseException:
            writer.close()
            raise
        await self._commit(writer)

    # ------------------------------------------------------------ disk budget
    async def _make_room(self, task: pb.DesiredTask, bundle: manifest.Manifest) -> None:
        """Fit the pull of `bundle` in the disk budget (freeing space), or raise DiskBudgetExceeded.

        Downloads under way for other releases keep their blobs and partials and count with the
        bytes they still need (their declared sizes), so concurrent pulls cannot add up past the budget.
        """
        if self.disk_budget is None:
            return
        async with self._store_lock:
            plan = await asyncio.to_thread(
                self.store.make_room, task.release, task.version, bundle, **self._budget_args(task.release)
            )
            self._reserved[task.release] = {f.sha256: f.size for f in bundle.files}
        if plan.gc:
            log.info(
                "disk budget %s: freed %s for %s v%d (%s)",
                store.format_size(self.disk_budget),
                store.format_size(plan.used - plan.after),
                task.release,
                task.version,
                ", ".join(f"removed {r} v{v}" for r, v in plan.evict) or "unreferenced blobs only",
            )

    def _budget_args(self, release: str) -> dict[str, Any]:
        """The budget, and what installs of other releases under way keep and still need (under the store lock)."""
        for r in [r for r in self._reserved if r not in self._inflight or r == release]:
            del self._reserved[r]  # finished (or this release's previous attempt)
        return {
            "budget": self.disk_budget,
            "keep": set().union(*(d for r, d in self._inflight.items() if r != release)),
            "reserved": {d: n for sizes in self._reserved.values() for d, n in sizes.items()},
        }

    async def _still_over_budget(self, task: pb.DesiredTask) -> None:
        """Raise DiskBudgetExceeded again, without fetching or reporting anything, while a refused version
        still does not fit (`_install` reports DOWNLOADING, which would hide the refusal).

        The store is measured again only when it may have changed (a garbage collection ran, after an
        install or uninstall) or every OVER_BUDGET_RECHECK_S, not on each pass of the release loop.
        """
        blocked = self._over_budget.get(task.release)
        if (
            self.disk_budget is None
            or blocked is None
            or (blocked.version, blocked.digest)
            != (
                task.version,
                task.manifest_digest,
            )
        ):
            return
        if blocked.bundle is None:
            return
        if blocked.gcs == self._gcs and time.monotonic() - blocked.checked_at < OVER_BUDGET_RECHECK_S:
            raise blocked.refusal
        async with self._store_lock:
            plan = await asyncio.to_thread(
                self.store.plan_room, task.release, task.version, blocked.bundle, **self._budget_args(task.release)
            )
        if not plan.fits:
            raise store.DiskBudgetExceeded(plan.message, plan=plan, manifest=blocked.bundle)

    async def _over_budget_wait(self, task: pb.DesiredTask, e: store.DiskBudgetExceeded) -> float | None:
        """A version that does not fit: report it FAILED (once), keep the installed version serving.

        Tried again when the release changes, when space is freed (`_gc` kicks), and every
        OVER_BUDGET_RECHECK_S. Returns the loop's wait.
        """
        release = task.release
        blocked = self._over_budget.get(release)
        self._over_budget[release] = _Blocked(
            version=task.version,
            digest=task.manifest_digest,
            bundle=e.manifest,
            refusal=e,
            gcs=self._gcs,
            checked_at=time.monotonic(),
        )
        if blocked is None or (blocked.version, blocked.digest) != (task.version, task.manifest_digest):
            log.warning("%s v%d not installed: %s", release, task.version, e)
            await self._report(task, S.DELIVERY_STATE_FAILED, str(e))
        wait: float | None = None
        installed = self.state.installed.get(release)
        if installed is not None and self.store.current(release) == installed.version:
            running = pb.DesiredTask(
                release=release,
                version=installed.version,
                manifest_digest=installed.manifest_digest,
                trigger_json=installed.trigger_json,
                resources_json=installed.resources_json,
            )
            try:
                wait = await self._maybe_run(running, self._policy(running))
            except asyncio.CancelledError:
                raise
            except Exception as run_error:  # retried with the next check; the refusal stands meanwhile
                log.warning("%s v%d: %s", release, installed.version, _describe(run_error))
        return OVER_BUDGET_RECHECK_S if wait is None else min(wait, OVER_BUDGET_RECHECK_S)

    async def _gc(self) -> None:
        keep = set().union(*self._inflight.values()) if self._inflight else set()
        async with self._store_lock:
            removed = await asyncio.to_thread(self.store.gc, keep=keep)
        self._gcs += 1
        if removed:
            log.debug("gc removed %d blobs", len(removed))
        if log.isEnabledFor(logging.DEBUG):
            usage = await asyncio.to_thread(self.store.snapshot)
            log.debug("bundle store: %s", usage.describe(self.disk_budget))
        for release in list(self._over_budget):  # space may have been freed: try those versions again
            if release in self._desired:
                self._kick(release)
            else:
                del self._over_budget[release]

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
        self.dispatch.disarm(release)
        log.info("uninstalled %s", release)
        if installed is not None:
            task = pb.DesiredTask(release=release, version=installed.version)
            await self._report(task, S.DELIVERY_STATE_UNINSTALLED)
        await self._gc()

    # ------------------------------------------------------------ runs
    async def _maybe_run(self, task: pb.DesiredTask, policy: Policy) -> float | None:
        """Run when the trigger says so. Returns seconds until the next check (None: only when kicked)."""
        conditions = participation.conditions_of(task.trigger_json)
        if conditions and not participation.met(conditions, self._device_state()):
            # Participation conditions (charging / unmetered / idle) not met: look again later.
            return participation.RECHECK_S
        trigger = policy.trigger
        self.dispatch.arm(task.release, task.version, trigger)  # pattern triggers start matching; cron is anchored
        runs = self.state.runs_of(task.release, task.version)
        interrupted = [r for r in runs if r.status == "running"]
        if interrupted:  # the agent stopped mid-run: run again under the same idempotency key
            await self._run(task, policy, key=interrupted[0].key)
            return self._next_check(task, trigger)
        # Pattern matches and on-demand requests, one at a time: if a run raises, the rest stay queued.
        while (pending := self.dispatch.next(task.release, task.version)) is not None:
            await self._run(task, policy, pending=pending)
        if trigger.type == "onInstall":
            if not any(r.trigger == "onInstall" for r in runs):
                await self._run(task, policy)
            return None
        due = self._next_check(task, trigger)
        if due is not None and due <= 0:
            await self._run(task, policy)
            return self._next_check(task, trigger)
        return due

    def _next_check(self, task: pb.DesiredTask, trigger: Trigger) -> float | None:
        """Seconds until an interval or cron trigger is due (0: now); None for triggers that are kicked."""
        if not trigger.scheduled:
            return None
        own = [r.started_at for r in self.state.runs_of(task.release, task.version) if r.trigger == trigger.type]
        armed_at = self.dispatch.armed_at(task.release)
        due = trigger.next_due(last_run=max(own, default=None), armed_at=self.clock() if armed_at is None else armed_at)
        return None if due is None else max(0.0, due - self.clock())

    async def _run(
        self,
        task: pb.DesiredTask,
        policy: Policy,
        *,
        key: str | None = None,
        pending: schedule.PendingRun | None = None,
    ) -> None:
        release, version = task.release, task.version
        bundle_dir = self.store.current_dir(release)
        if bundle_dir is None or self.store.current(release) != version:
            raise errors.FailedPrecondition(f"{release} v{version} is not installed")
        bundle = self.store.installed_manifest(release, version)
        if pending is not None and pending.request_id:  # on demand: a repeated request runs once
            key = f"{self.device_id}:{release}:{version}:demand-{pending.request_id}"
            if key in self.state.runs and self.state.runs[key].status != "running":
                return
        key = key or f"{self.device_id}:{release}:{version}:{uuid.uuid4().hex}"
        inputs = await asyncio.to_thread(self._run_inputs, key, policy.trigger, pending)
        record = self.state.runs.get(key) or store.RunRecord(
            key=key,
            release=release,
            version=version,
            trigger=pending.trigger if pending is not None else policy.trigger.type,
            status="running",
            started_at=0.0,
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
                    limits=policy.limits,
                    threads=self.threads,
                    work_dir=self.state_dir,
                    selection=await self._backend_choices(bundle),
                    inputs=inputs,
                )
            except errors.TaskFailed as e:
                record.status, record.finished_at, record.message = "failed", self.clock(), str(e)[:2000]
                self._inputs_path(key).unlink(missing_ok=True)
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
            self._inputs_path(key).unlink(missing_ok=True)

        await asyncio.to_thread(persist)
        await self._upload(task, record)

    def _inputs_path(self, key: str) -> pathlib.Path:
        return self.store.result_path(key).with_suffix(".inputs.json")

    def _run_inputs(self, key: str, trigger: Trigger, pending: schedule.PendingRun | None) -> dict[str, Any]:
        """`ctx.inputs` of a run, kept beside its record until it finished: a re-run after a crash gets the same."""
        path = self._inputs_path(key)
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_bytes())
            if isinstance(doc, dict):
                return doc
        now = self.clock()
        if pending is not None and pending.trigger == "pattern":
            inputs = dict(pending.inputs)  # the match and the window as they were when it fired
        else:
            inputs = {**self.dispatch.scheduled_inputs(trigger, now=now), **(pending.inputs if pending else {})}
        store.atomic_write(path, json.dumps(inputs, allow_nan=False).encode("utf-8"))
        return inputs

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


def _write_chunk(writer: store.BlobWriter, chunk: pb.BlobChunk) -> None:
    """One received chunk into its blob's partial; a blob whose size differs from the manifest's is refused."""
    if chunk.total_size and chunk.total_size != writer.expected_size:
        raise errors.DigestMismatch(
            f"blob {writer.digest} is {chunk.total_size} bytes; the manifest says {writer.expected_size}"
        )
    writer.write(chunk.data, offset=chunk.offset)


def _resume_offset(partial_size: int, size: int) -> int:
    """Where a blob's download resumes: its partial's size (a partial longer than the blob starts over)."""
    return partial_size if partial_size <= size else 0


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
