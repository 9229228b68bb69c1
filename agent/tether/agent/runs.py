"""Running installed tasks on their triggers, and uploading what they produce, exactly-once-ish.

Each desired task carries its release's policy (`trigger_json`,
`resources_json`). The trigger decides when it runs (`tether.agent.schedule`:
onInstall, interval, cron, onDemand, event patterns); the resources are its
per-run limits, each capped by the agent's own limits, which are also the
limits when the release sets none. Participation conditions (charging,
unmetered, idle) defer a run, they do not skip it.

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

from tether.agent import backends, bundles, client, participation, reporting, results, runtime, schedule, statefile
from tether.agent.files import atomic_write
from tether.common import errors, manifest, tracing
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import names, triggers

log = logging.getLogger(__name__)

S = pb.DeliveryState
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
        slots: asyncio.Semaphore | None,
        clock: Callable[[], float],
        device_id: Callable[[], str],
        desired: Mapping[str, pb.DesiredTask],
        emit_grant: Callable[[str], Mapping[str, Any] | None] | None = None,  # tunnel.relay.Tunnel.grant
    ) -> None:
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
        if conditions and not participation.met(conditions, self._reporter.device_state()):
            # Participation conditions (charging / unmetered / idle) not met: look again later.
            return participation.RECHECK_S
        trigger = policy.trigger
        self._dispatch.arm(task.release, task.version, trigger)  # pattern triggers start matching; cron is anchored
        runs = self._ledger.state.runs_of(task.release, task.version)
        interrupted = [r for r in runs if r.status == "running"]
        if interrupted:  # the agent stopped mid-run: run again under the same idempotency key
            await self._run(task, policy, key=interrupted[0].key)
            return self._next_check(task, trigger)
        # Pattern matches and on-demand requests, one at a time: if a run raises, the rest stay queued.
        while (pending := self._dispatch.next(task.release, task.version)) is not None:
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
        async with self._slots or contextlib.nullcontext():
            record.status, record.started_at = "running", self._clock()
            state.runs[key] = record
            await self._ledger.save()  # intent first: a restart reuses this key
            await self._reporter.status(task, S.DELIVERY_STATE_RUNNING)
            try:
                outcome = await runtime.run_task(
                    bundle_dir=bundle_dir,
                    bundle=bundle,
                    data_dir=self._settings.data_dir,
                    state=self._store.load_task_state(release),
                    limits=policy.limits,
                    threads=self._settings.threads,
                    work_dir=self._settings.work_dir,
                    selection=await self._backend_choices(bundle),
                    inputs=inputs,
                    emit=self._emit_grant(release) if self._emit_grant is not None else None,
                )
            except errors.TaskFailed as e:
                record.status, record.finished_at, record.message = "failed", self._clock(), str(e)[:2000]
                self._inputs_path(key).unlink(missing_ok=True)
                await self._ledger.save()
                log.warning("%s v%d failed: %s", release, version, str(e).splitlines()[0] if str(e) else e)
                await self._reporter.status(task, S.DELIVERY_STATE_FAILED, str(e))
                return
        for line in outcome.logs:
            log.info("[%s] %s", release, line)
        request = results.to_upload_request(
            outcome.result, release=release, version=version, idempotency_key=key, duration_s=outcome.duration_s
        )

        def persist() -> None:
            atomic_write(self._store.result_path(key), request.SerializeToString())
            self._store.save_task_state(release, outcome.state)
            record.status, record.finished_at = "uploading", self._clock()
            record.message = outcome.backend
            self._ledger.save_now()
            self._inputs_path(key).unlink(missing_ok=True)

        await asyncio.to_thread(persist)
        await self._upload(task, record)

    async def _backend_choices(self, bundle: manifest.Manifest) -> dict[str, Any]:
        if self._selector is None:
            return {}
        await self._selector.profile()
        return self._selector.choices(bundle)

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
