"""Running installed tasks on their triggers, and uploading what they produce, exactly-once-ish.

Each desired task carries its release's policy (`trigger_json`,
`resources_json`). The trigger decides when it runs (`tether.agent.schedule`:
onInstall, interval, cron, onDemand, event patterns); the resources are its
per-run limits, each capped by the agent's own limits, which are also the
limits when the release sets none. Participation conditions (charging,
unmetered, idle) defer a run, they do not skip it.

A run goes to the task version's warm worker (`tether.agent.warmpool`,
started ahead of the first trigger where there is room), or to a fresh
interpreter (`runtime.run_task`) where the bundle's `runtime.isolation` or
the agent's `--isolation` asks for one. Each run holds a device-wide slot
(`slots.FairSlots`, round-robin across tasks); runs of one task are
serialized unless the bundle's `runtime.concurrency` lets queued runs overlap.

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
import pathlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from tether.agent import (
    backends,
    bundles,
    client,
    participation,
    reporting,
    results,
    round_update,
    runtime,
    schedule,
    slots,
    statefile,
    warmpool,
)
from tether.agent.files import atomic_write
from tether.common import errors, manifest, tracing
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import names, triggers

log = logging.getLogger(__name__)

S = pb.DeliveryState
OVERLAP_POLL_S = 0.05  # how often a task that allows overlapping runs looks for newly queued ones meanwhile
# Errors after which retrying the same upload cannot help.
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
class Policy:
    """How one desired task runs: its trigger and the limits of each run."""

    trigger: triggers.Trigger
    limits: runtime.TaskLimits

    @classmethod
    def of(cls, task: pb.DesiredTask, *, caps: runtime.TaskLimits) -> Policy:
        """The task's policy within the device caps; InvalidSpec (naming the field) when it is malformed."""
        return cls(
            trigger=triggers.Trigger.from_json(task.trigger_json),
            limits=runtime.TaskLimits.from_wire(task.resources_json, caps=caps),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The agent's own settings for every run."""

    data_dir: pathlib.Path
    work_dir: pathlib.Path
    limits: runtime.TaskLimits
    threads: int = 1
    isolation: str = "warm"  # `tether agent run --isolation`: "fresh" runs every task in a new interpreter


class Runner:
    """Runs one device's installed tasks and uploads their results."""

    def __init__(
        self,
        *,
        device: client.DeviceClient,
        ledger: statefile.Ledger,
        store: bundles.BundleStore,
        reporter: reporting.Reporter,
        dispatch: schedule.Dispatcher,
        selector: backends.Selector | None,
        settings: RunSettings,
        slots: slots.FairSlots | None,
        clock: Callable[[], float],
        device_id: Callable[[], str],
        desired: Mapping[str, pb.DesiredTask],
        pool: warmpool.WorkerPool | None = None,
        emit_grant: Callable[[str], Mapping[str, Any] | None] | None = None,  # tunnel.relay.Tunnel.grant
    ) -> None:
        self._pool = pool
        self._prewarmed: set[tuple[str, int]] = set()
        self._client = device
        self._emit_grant = emit_grant
        self._desired = desired
        self._ledger = ledger
        self._store = store
        self._reporter = reporter
        self._dispatch = dispatch
        self._selector = selector
        self._settings = settings
        self._slots = slots
        self._clock = clock
        self._device_id = device_id

    def policy(self, task: pb.DesiredTask) -> tuple[Policy | None, str | None]:
        """The task's policy, or why this agent cannot honour it (then the version is refused)."""
        try:
            return Policy.of(task, caps=self._settings.limits), None
        except errors.InvalidSpec as e:
            return None, f"release policy not usable by this agent: {e}"

    async def maybe_run(self, task: pb.DesiredTask, policy: Policy) -> float | None:
        """Run when the trigger says so. Returns seconds until the next check (None: only when kicked)."""
        conditions = participation.conditions_of(task.trigger_json)
        if conditions and await self._reporter.hold(task.release, conditions):
            # Participation conditions (charging / unmetered / idle) not met or unknown: look again later.
            return participation.RECHECK_S
        trigger = policy.trigger
        self._dispatch.arm(task.release, task.version, trigger)  # pattern triggers start matching; cron is anchored
        if trigger.type != "onInstall" and (task.release, task.version) not in self._prewarmed:
            self._prewarmed.add((task.release, task.version))
            await self._prewarm(task, policy)  # its first run (or an upgrade's) finds its worker started
        runs = self._ledger.state.runs_of(task.release, task.version)
        interrupted = [r for r in runs if r.status == "running"]
        if interrupted:  # the agent stopped mid-run: run again under the same idempotency key
            await self._run(task, policy, key=interrupted[0].key)
            return self._next_check(task, trigger)
        # Pattern matches and on-demand requests, as many at once as the bundle's runtime.concurrency
        # (default one at a time): if a run raises, the rest stay queued.
        overlap = await asyncio.to_thread(self._concurrency, task)
        if overlap == 1:
            while (pending := self._dispatch.next(task.release, task.version)) is not None:
                await self._run(task, policy, pending=pending)
        else:
            await self._overlapping(task, policy, overlap)
        if trigger.type == "onInstall":
            if not any(r.trigger == "onInstall" for r in runs):
                await self._run(task, policy)
            return None
        due = self._next_check(task, trigger)
        if due is not None and due <= 0:
            await self._run(task, policy)
            return self._next_check(task, trigger)
        return due

    async def _overlapping(self, task: pb.DesiredTask, policy: Policy, overlap: int) -> None:
        """Queued runs, up to `overlap` at once; runs queued while others are under way join them."""
        in_flight: set[asyncio.Task[None]] = set()
        error: BaseException | None = None
        try:
            while True:
                while error is None and len(in_flight) < overlap:
                    pending = self._dispatch.next(task.release, task.version)
                    if pending is None:
                        break
                    in_flight.add(asyncio.create_task(self._run(task, policy, pending=pending)))
                if not in_flight:
                    break
                done, in_flight = await asyncio.wait(
                    in_flight, timeout=OVERLAP_POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
                for finished in done:
                    if error is None and finished.exception() is not None:
                        error = finished.exception()
        finally:
            for t in in_flight:  # cancelled (the agent stops): never leave a run behind
                t.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        if error is not None:
            raise error

    def _concurrency(self, task: pb.DesiredTask) -> int:
        try:
            return self._store.installed_manifest(task.release, task.version).runtime.concurrency
        except (OSError, errors.TetherError):
            return 1

    def _next_check(self, task: pb.DesiredTask, trigger: triggers.Trigger) -> float | None:
        """Seconds until an interval or cron trigger is due (0: now); None for triggers that are kicked."""
        if not trigger.scheduled:
            return None
        runs = self._ledger.state.runs_of(task.release, task.version)
        own = [r.started_at for r in runs if r.trigger == trigger.type]
        armed_at = self._dispatch.armed_at(task.release)
        due = trigger.next_due(
            last_run=max(own, default=None), armed_at=self._clock() if armed_at is None else armed_at
        )
        return None if due is None else max(0.0, due - self._clock())

    async def _run(
        self,
        task: pb.DesiredTask,
        policy: Policy,
        *,
        key: str | None = None,
        pending: schedule.PendingRun | None = None,
    ) -> None:
        release, version = task.release, task.version
        bundle_dir = self._store.current_dir(release)
        if bundle_dir is None or self._store.current(release) != version:
            raise errors.FailedPrecondition(f"{release} v{version} is not installed")
        bundle = self._store.installed_manifest(release, version)
        state = self._ledger.state
        if pending is not None and pending.request_id:  # on demand: a repeated request runs once
            key = names.idempotency_key(
                device_id=self._device_id(), release=release, version=version, suffix=f"demand-{pending.request_id}"
            )
            if key in state.runs and state.runs[key].status != "running":
                return
        key = key or names.idempotency_key(
            device_id=self._device_id(), release=release, version=version, suffix=uuid.uuid4().hex
        )
        inputs = await asyncio.to_thread(self._run_inputs, key, policy.trigger, pending)
        record = state.runs.get(key) or statefile.RunRecord(
            key=key,
            release=release,
            version=version,
            trigger=pending.trigger if pending is not None else policy.trigger.type,
            status="running",
            started_at=0.0,
        )
        async with self._slots.hold(f"{self._device_id()}/{release}") if self._slots else contextlib.nullcontext():
            record.status, record.started_at = "running", self._clock()
            state.runs[key] = record
            await self._ledger.save()  # intent first: a restart reuses this key
            await self._reporter.status(task, S.DELIVERY_STATE_RUNNING)
            try:
                outcome = await self._execute(task, bundle_dir, bundle, policy.limits, inputs)
            except errors.TaskFailed as e:
                record.status, record.finished_at, record.message = "failed", self._clock(), str(e)[:2000]
                self._inputs_path(key).unlink(missing_ok=True)
                await self._ledger.save()
                log.warning("%s v%d failed: %s", release, version, str(e).splitlines()[0] if str(e) else e)
                await self._reporter.status(task, S.DELIVERY_STATE_FAILED, str(e))
                return
        for line in outcome.logs:
            log.info("[%s] %s", release, line)
        result = outcome.result
        update: tuple[pb.UpdateHeader, bytes] | None = None
        try:
            fed = round_update.round_of(inputs)
            if fed is not None:  # a federated round: the tensors go as the update, not in the result
                update = round_update.encode(
                    result.tensors,
                    run=fed,
                    release=release,
                    version=version,
                    sample_count=result.sample_count,
                    metrics=result.metrics,
                )
                result = dataclasses.replace(result, tensors={})
        except errors.TaskFailed as e:
            record.status, record.finished_at, record.message = "failed", self._clock(), str(e)[:2000]
            self._inputs_path(key).unlink(missing_ok=True)
            await self._ledger.save()
            log.warning("%s v%d failed: %s", release, version, e)
            await self._reporter.status(task, S.DELIVERY_STATE_FAILED, str(e))
            return
        request = results.to_upload_request(
            result, release=release, version=version, idempotency_key=key, duration_s=outcome.duration_s
        )

        def persist() -> None:
            if update is not None:  # before the result: a stored result with an update file beside it pushes it first
                atomic_write(self._update_path(key), update[1])
                atomic_write(self._update_path(key).with_suffix(".header"), update[0].SerializeToString())
            atomic_write(self._store.result_path(key), request.SerializeToString())
            self._store.save_task_state(release, outcome.state)
            record.status, record.finished_at = "uploading", self._clock()
            record.message = outcome.backend
            self._ledger.save_now()
            self._inputs_path(key).unlink(missing_ok=True)

        await asyncio.to_thread(persist)
        await self._upload(task, record)

    async def _execute(
        self,
        task: pb.DesiredTask,
        bundle_dir: pathlib.Path,
        bundle: manifest.Manifest,
        limits: runtime.TaskLimits,
        inputs: Mapping[str, Any],
    ) -> runtime.TaskOutcome:
        """One run: on the task's warm worker, or in a fresh interpreter where the bundle or the agent asks."""
        common: dict[str, Any] = {
            "bundle_dir": bundle_dir,
            "bundle": bundle,
            "data_dir": self._settings.data_dir,
            "state": self._store.load_task_state(task.release),
            "limits": limits,
            "threads": self._settings.threads,
            "selection": await self._backend_choices(bundle),
            "inputs": inputs,
            "emit": self._emit_grant(task.release) if self._emit_grant is not None else None,  # ctx.emit
        }
        warm = self._settings.isolation == "warm" and bundle.runtime.isolation == "warm"
        if self._pool is not None and warm and self._pool.supports(limits):
            return await self._pool.run(release=task.release, version=task.version, **common)
        return await runtime.run_task(work_dir=self._settings.work_dir, **common)

    async def _prewarm(self, task: pb.DesiredTask, policy: Policy) -> None:
        bundle_dir = self._store.current_dir(task.release)
        if self._pool is None or self._settings.isolation != "warm" or bundle_dir is None:
            return
        if self._store.current(task.release) != task.version:
            return
        try:
            bundle = await asyncio.to_thread(self._store.installed_manifest, task.release, task.version)
        except (OSError, errors.TetherError):
            return  # not installed (yet): its runs will say so
        if bundle.runtime.isolation == "warm" and self._pool.supports(policy.limits):
            self._pool.prewarm(
                release=task.release,
                version=task.version,
                bundle_dir=bundle_dir,
                bundle=bundle,
                data_dir=self._settings.data_dir,
                limits=policy.limits,
                threads=self._settings.threads,
                selection=await self._backend_choices(bundle),
            )

    async def _backend_choices(self, bundle: manifest.Manifest) -> dict[str, Any]:
        if self._selector is None:
            return {}
        await self._selector.profile()
        return self._selector.choices(bundle)

    def _update_path(self, key: str) -> pathlib.Path:
        return self._store.result_path(key).with_suffix(".update")

    async def _push_update(self, task: pb.DesiredTask, record: statefile.RunRecord) -> None:
        """Send the run's stored update, if it has one; a refusal drops it (the controller counted it)."""
        path = self._update_path(record.key)
        header_path = path.with_suffix(".header")
        try:
            data = await asyncio.to_thread(path.read_bytes)
            header = pb.UpdateHeader.FromString(await asyncio.to_thread(header_path.read_bytes))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("%s: stored update unreadable, dropped: %s", task.release, e)
            path.unlink(missing_ok=True)
            header_path.unlink(missing_ok=True)
            return
        try:
            response = await self._client.push_update(header, data)
            log.info(
                "%s round %d: update %s%s",
                task.release,
                header.round,
                "accepted" if response.accepted else "kept late",
                "" if response.accepted else f" ({response.message})",
            )
        except grpc.aio.AioRpcError as e:
            if e.code() not in _PERMANENT:
                raise  # kept: sent again with the upload
            log.warning("%s round %d: update refused: %s %s", task.release, header.round, e.code().name, e.details())
        path.unlink(missing_ok=True)
        header_path.unlink(missing_ok=True)

    def _inputs_path(self, key: str) -> pathlib.Path:
        return self._store.result_path(key).with_suffix(".inputs.json")

    def _run_inputs(self, key: str, trigger: triggers.Trigger, pending: schedule.PendingRun | None) -> dict[str, Any]:
        """`ctx.inputs` of a run, kept beside its record until it finished: a re-run after a crash gets the same."""
        path = self._inputs_path(key)
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_bytes())
            if isinstance(doc, dict):
                return doc
        now = self._clock()
        if pending is not None and pending.trigger == "pattern":
            inputs = dict(pending.inputs)  # the match and the window as they were when it fired
        else:
            inputs = {**self._dispatch.scheduled_inputs(trigger, now=now), **(pending.inputs if pending else {})}
        atomic_write(path, json.dumps(inputs, allow_nan=False).encode("utf-8"))
        return inputs

    # ------------------------------------------------------------ uploads
    async def flush_uploads(self, release: str) -> None:
        """Upload finished runs still pending; a run of a version no longer desired will not finish."""
        for record in self._ledger.state.runs_of(release):
            if record.status == "uploading":
                task = pb.DesiredTask(release=record.release, version=record.version)
                await self._upload(task, record)
            elif record.status == "running" and (
                release not in self._desired or record.version != self._desired[release].version
            ):
                record.status, record.message = "failed", "superseded by a newer version before it finished"
                await self._ledger.save()

    async def _upload(self, task: pb.DesiredTask, record: statefile.RunRecord) -> None:
        await self._push_update(task, record)
        path = self._store.result_path(record.key)
        try:
            request = pb.UploadResultRequest.FromString(await asyncio.to_thread(path.read_bytes))
        except (OSError, ValueError) as e:
            record.status, record.message = "failed", f"stored result unreadable: {e}"
            await self._ledger.save()
            await self._reporter.status(task, S.DELIVERY_STATE_FAILED, record.message)
            return
        try:
            with tracing.span("upload", release=task.release, version=task.version):
                response = await self._client.upload_result(request)
        except grpc.aio.AioRpcError as e:
            if e.code() not in _PERMANENT:
                raise  # kept as "uploading": retried with the same key
            record.status, record.message = "failed", f"upload refused: {e.code().name} {e.details()}"
            path.unlink(missing_ok=True)
            await self._ledger.save()
            await self._reporter.status(task, S.DELIVERY_STATE_FAILED, record.message)
            return
        record.status = "uploaded"
        path.unlink(missing_ok=True)
        await self._ledger.save()
        log.info(
            "uploaded %s v%d (%d samples%s)",
            task.release,
            task.version,
            request.sample_count,
            ", duplicate" if response.duplicate else "",
        )
        await self._reporter.status(task, S.DELIVERY_STATE_SUCCEEDED)
