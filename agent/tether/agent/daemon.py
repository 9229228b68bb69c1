"""The edge agent: a small coordinator over rooms that each do one job.

One `Agent` per device. It owns the desired state (what the controller wants
on this device, from the stream's Sync, Notify and Revoke) and one asyncio
task per release (`_release_loop`) that converges the device on it: every pass
asks the pure planner (`tether.agent.convergence.plan`) for the next step and
performs it with the rooms:

- `session`: enrolment, credential renewal, the Subscribe stream (reconnects);
- `pull`: the verified manifest and the blobs the device lacks (resumable);
- `install`: disk budget, atomic install, uninstall, garbage collection;
- `runs`: triggers, running tasks, exactly-once-ish uploads;
- `reporting`: delivery states and backend choices for the controller.

Every failure of an install is judged once by `tether.agent.failures.classify`:
a tampered manifest or blob, an invalid or conflicting manifest, or a policy
this agent cannot honour refuses the version (`REFUSED`): it never runs and is
not retried until the release announces a different version. A failure the
same version will meet again on this device (a permission problem on the
store, a name the filesystem will not take) is reported `FAILED` once and not
retried until another version or a restart. Anything else (the network, a
disk momentarily full) is retried with backoff. A failing task, a bad bundle
or a lost connection affects only its own release; the agent keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from tether.agent import (
    bundles,
    client,
    convergence,
    devicestate,
    diskbudget,
    engine,
    failures,
    httpfetch,
    install,
    participation,
    pull,
    reporting,
    runs,
    runtime,
    schedule,
    session,
    sizes,
    slots,
    statefile,
    warmpool,
)
from tether.agent.backends import CACHE_FILE, Selector
from tether.agent.stream import endpoint as event_server
from tether.agent.stream import eventstore, processor
from tether.agent.tunnel import relay
from tether.common import errors, manifest, tracing
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import emits

log = logging.getLogger(__name__)

S = pb.DeliveryState


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
        task_slots: slots.FairSlots | int | None = None,
        workers: warmpool.WorkerPool | warmpool.PoolSettings | None = None,
        isolation: str = "warm",
        limits: runtime.TaskLimits = runtime.TaskLimits(),
        threads: int = 1,
        trusted_keys: Mapping[str, bytes] | None = None,
        backoff: client.Backoff = client.Backoff(),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        device_state: participation.StateProbe | None = None,
        conditions_unknown: str = "wait",
        backend_selection: bool = True,
        selector: Selector | None = None,
        events_socket: str | os.PathLike[str] | None = None,
        event_retention: tuple[int, float] = (eventstore.DEFAULT_MAX_EVENTS, eventstore.DEFAULT_MAX_AGE_S),
        disk_budget: int | None = sizes.DEFAULT_DISK_BUDGET,
        http_settings: httpfetch.HttpSettings | None = None,
        tunnel_limits: emits.TunnelLimits | None = emits.TunnelLimits(),  # None: no real-time tunnel
        channel_options: Sequence[tuple[str, int | str]] = client.DEFAULT_OPTIONS,
    ) -> None:
        self.controller = controller
        self.state_dir = pathlib.Path(state_dir)
        self.data_dir = pathlib.Path(data_dir)
        self.attributes = dict(attributes or {})
        self.backends = backends
        self.bootstrap_token = bootstrap_token
        self.limits = limits
        self.threads = threads
        self.trusted_keys = dict(trusted_keys) if trusted_keys is not None else None
        self.backoff = backoff
        self.clock = clock
        # Charging / unmetered / idle (tether.agent.devicestate): probed, overridden by the app's reports.
        self.conditions = devicestate.Conditions(probe=device_state or devicestate.probe, unknown=conditions_unknown)
        self.conditions.on_report = lambda: list(map(self._kick, list(self._desired)))  # waiting ones look again
        self._requested_device_id = device_id
        self._rng = rng = rng or random.Random()
        self.store = bundles.BundleStore(self.state_dir)
        self.ledger = statefile.Ledger(self.state_dir / "state.json")
        # Backend selection (tether.agent.backends): per model, before a version goes live. A simulated
        # fleet passes one shared selector; `backend_selection=False` runs every model as its bundle says.
        self.selector: Selector | None = None
        if backend_selection:
            self.selector = selector or Selector(
                cache_path=self.state_dir / CACHE_FILE, backends=backends, memory_mb=limits.memory_mb
            )
        self._desired: dict[str, pb.DesiredTask] = {}
        # The trace context a Notify carried, per release: (version, context) the install and runs join.
        self._traces: dict[str, tuple[int, Any]] = {}
        self._kicks: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.synced = asyncio.Event()  # set once the first Sync was handled
        # On-device stream processing: events (local socket or `self.stream.ingest`) -> bounded store ->
        # pattern triggers; `events_socket` None means no socket (events can still be fed in-process).
        max_events, max_age_s = event_retention
        self.stream = processor.StreamProcessor(
            eventstore.EventStore(
                self.state_dir / "events.db", max_events=max_events, max_age_s=max_age_s, clock=clock
            ),
            clock=clock,
        )
        self.dispatch = schedule.Dispatcher(self.stream, clock=clock, kick=self._kick)
        self._events_socket = events_socket
        self._event_server: event_server.EventServer | None = None

        # The rooms.
        self.client = client.DeviceClient(
            controller,
            credential=self.state.credential,
            channel_credentials=channel_credentials,
            options=channel_options,  # keepalive: how soon a black-holed connection is given up
        )
        self.session = session.Session(
            device=self.client,
            state=self.state,
            persist=self.ledger.save,
            describe=self._describe,
            bootstrap_token=bootstrap_token,
            backoff=backoff,
            rng=rng,
            clock=clock,
        )
        self.connected = self.session.connected  # set while the Subscribe stream is open
        self.tunnel = relay.for_agent(self.state_dir, self.client.emit, tunnel_limits, self.connected)  # ctx.emit
        self.reporter = reporting.Reporter(device=self.client, gate=self.conditions, backoff=backoff)
        self.backend_reports = (
            None
            if self.selector is None
            else reporting.BackendReports(
                device=self.client,
                selector=self.selector,
                state=self.state,
                store=self.store,
                stopping=self.session.stopping,
            )
        )
        self.puller = pull.Puller(
            device=self.client,
            sink=pull.FileSink(self.store),
            rng=rng,
            observer=session.LogFailures(bootstrap_token=bootstrap_token),
            http=httpfetch.HttpFetcher(http_settings),
            on_url_failure=self.reporter.note_url_failure,  # told to the controller with the next report
        )
        self.installer = install.Installer(
            store=self.store,
            ledger=self.ledger,
            puller=self.puller,
            reporter=self.reporter,
            selector=self.selector,
            disk_budget=disk_budget,
            trusted_keys=self.trusted_keys,
            device_backends=lambda: self.backends,
            work_dir=self.state_dir,
            desired=self._desired,
            kick=self._kick,
            installed_hook=self._backends_changed,
        )
        self._own_pool, self.workers, fair = _workers_and_slots(workers, task_slots, self.state_dir, threads)
        self.runner = runs.Runner(
            device=self.client,
            ledger=self.ledger,
            store=self.store,
            reporter=self.reporter,
            dispatch=self.dispatch,
            selector=self.selector,
            settings=runs.RunSettings(
                data_dir=self.data_dir, work_dir=self.state_dir, limits=limits, threads=threads, isolation=isolation
            ),
            slots=fair,
            pool=self.workers,
            clock=clock,
            device_id=lambda: self.device_id,
            desired=self._desired,
            emit_grant=self.tunnel.grant,
        )

    # ------------------------------------------------------------ public
    @property
    def state(self) -> statefile.AgentState:
        return self.ledger.state

    @property
    def device_id(self) -> str:
        return self.state.device_id or self._requested_device_id or ""

    @property
    def disk_budget(self) -> int | None:
        return self.installer.disk_budget

    def stop(self) -> None:
        self.session.stopping.set()

    async def run(self) -> None:
        """Enrol if needed, then hold the event stream until `stop()`; always cleans up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        usage, _ = await asyncio.to_thread(lambda: (self.store.snapshot(), self.conditions.probed()))
        log.info("bundle store %s: %s", self.state_dir, usage.describe(self.disk_budget))
        self.client.credential = self.state.credential
        try:
            await self.tunnel.start()  # tasks may emit before the device is enrolled: the outbox keeps it
            if self._events_socket is not None:  # apps may report events before the device is enrolled
                state = self.conditions.report  # and device state (charging, metered, idle)
                self._event_server = event_server.EventServer(self.stream, self._events_socket, state_report=state)
                await self._event_server.start()
            await _until_stopped(self.session.stopping, self.session.enrol_with_retry())
            if self.session.stopping.is_set():
                return
            # Resume what was installed before a restart (pending uploads, interval triggers);
            # the stream's opening Sync corrects the desired set.
            for release, installed in self.state.installed.items():
                self._desired.setdefault(release, _as_desired(installed))
                self._kick(release)
            # The credential expires: the session renews it while the stream runs.
            await _until_stopped(
                self.session.stopping,
                self.session.hold(on_event=self._on_event, installed=self._installed, on_connected=self._connected),
            )
        finally:
            self.connected.clear()
            workers = list(self._workers.values())
            if self.backend_reports is not None and (report := self.backend_reports.cancel()) is not None:
                workers.append(report)
            if (retry := self.reporter.cancel()) is not None:
                workers.append(retry)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            server, self._event_server = self._event_server, None
            await _quietly(server.stop if server is not None else None)  # before the store it writes to
            self.stream.store.close()
            http = self.puller.http
            await _quietly(
                self.workers.close if self._own_pool else None,
                self.tunnel.stop,
                self.client.close,
                http.close if http is not None else None,
                self.ledger.save,
            )
            log.info("agent %s stopped", self.device_id)

    # ------------------------------------------------------------ helpers
    async def _describe(self) -> pb.DeviceInfo:
        """What this device enrols as (its backends detected on first enrolment)."""
        if self.backends is None:
            self.backends = await asyncio.to_thread(engine.detect_backends)
        device_id = self.state.device_id or self._requested_device_id or session.new_device_id()
        return pb.DeviceInfo(device_id=device_id, attributes=self.attributes, backends=self.backends)

    def _installed(self) -> list[pb.DesiredTask]:
        return [
            pb.DesiredTask(release=r, version=t.version, manifest_digest=t.manifest_digest)
            for r, t in sorted(self.state.installed.items())
        ]

    def _connected(self) -> None:
        self.puller.connected()
        self.reporter.connected()  # reports lost with the last connection go again

    def _backends_changed(self) -> None:
        if self.backend_reports is not None:
            self.backend_reports.changed()

    # ------------------------------------------------------------ the desired state
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
            if self.backend_reports is not None:
                self.backend_reports.soon()
        elif kind == "notify":
            notify = event.notify
            self.puller.notified.heard(notify, now=time.monotonic())  # its manifest and pull moment, for the install
            if notify.trace_context and tracing.active():
                self._traces[notify.task.release] = (notify.task.version, tracing.extract(notify.trace_context))
            self._set_desired(notify.task)
        elif kind == "revoke":
            self._desired.pop(event.revoke.release, None)
            self.puller.notified.forget(event.revoke.release)
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
            bundles.release_dirname(task.release)
            manifest.check_digest(task.manifest_digest)
        except errors.TetherError as e:
            log.warning("ignoring malformed desired task %r: %s", task.release, e)
            return
        current = self._desired.get(task.release)
        if current is not None and current.version > task.version and not task.rollback:
            return  # an older announcement arriving late (a rollback to it is not late: it is meant)
        self._desired[task.release] = task
        self._kick(task.release)

    def _trace(self, task: pb.DesiredTask) -> Any:
        """The context of the Notify that announced this version, if it carried one (else a trace of its own)."""
        version, context = self._traces.get(task.release, (None, None))
        return context if version == task.version else None

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
        while not self.session.stopping.is_set():
            kick.clear()
            wait: float | None = None
            task = self._desired.get(release)
            installing = False  # a failure while installing is judged by failures.classify
            try:
                policy, policy_error = None, None
                if task is not None:
                    await self.runner.flush_uploads(release)
                    policy, policy_error = self.runner.policy(task)
                step = _next_step(self, release, task, policy_error)
                if isinstance(step, convergence.Retire):
                    self._workers.pop(release, None)
                    return
                if isinstance(step, convergence.Uninstall):
                    await self._uninstall(release)
                    continue
                assert task is not None
                installing = True
                if isinstance(step, convergence.Refuse):
                    raise errors.VerificationFailed(step.reason)
                if isinstance(step, convergence.StillBlocked):
                    raise self.installer.blocked[release].refusal
                if isinstance(step, convergence.WaitForTurn | convergence.Install):
                    if step.recheck_budget:
                        await self.installer.recheck_budget(task)  # a version refused for space: only once it fits
                    delay = self.puller.notified.pull_delay(release, now=time.monotonic())  # the moment is taken
                    if isinstance(step, convergence.WaitForTurn):
                        log.debug("%s v%d: pulls in %.2fs (controller's spread)", release, task.version, delay)
                        await self.session.sleep(delay)
                        continue  # then as desired by then
                    with tracing.span("install", parent=self._trace(task), release=release, version=task.version):
                        await self.installer.install(task)
                    self.installer.blocked.pop(release, None)
                    self.installer.failed.pop(release, None)
                installing = False
                if isinstance(step, convergence.Install | convergence.Run):
                    assert policy is not None
                    with tracing.span("run", parent=self._trace(task), release=release, version=task.version):
                        wait = await self.runner.maybe_run(task, policy)
                attempt = 0
                self.installer.blocked.pop(release, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                verdict = failures.classify(e)
                if verdict.outcome is failures.Outcome.OVER_BUDGET and task is not None:
                    assert isinstance(e, diskbudget.DiskBudgetExceeded)
                    wait = await self._over_budget_wait(task, e)
                elif task is not None and verdict.permanent and (installing or _refusal(e)):
                    await self.installer.give_up(task, verdict)
                else:
                    # Network trouble, a disk momentarily full, a bug: retry this release later; others carry on.
                    wait = self.session.backoff.delay(attempt, self._rng)
                    attempt += 1
                    level = logging.INFO if client.is_retryable(e) else logging.WARNING
                    log.log(level, "%s: %s (retrying in %.1fs)", release, client.describe(e), wait, exc_info=level > 20)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kick.wait(), timeout=wait)

    async def _over_budget_wait(self, task: pb.DesiredTask, e: diskbudget.DiskBudgetExceeded) -> float | None:
        """A version that does not fit: report it FAILED (once), keep the installed version serving.

        Tried again when the release changes, when space is freed (a garbage collection kicks), and
        every OVER_BUDGET_RECHECK_S. Returns the loop's wait.
        """
        release = task.release
        if self.installer.block(task, e):
            log.warning("%s v%d not installed: %s", release, task.version, e)
            await self.reporter.status(task, S.DELIVERY_STATE_FAILED, str(e))
        wait: float | None = None
        installed = self.state.installed.get(release)
        if installed is not None and self.store.current(release) == installed.version:
            running = _as_desired(installed)
            try:
                policy, why = self.runner.policy(running)
                if policy is None:
                    raise errors.VerificationFailed(why)
                wait = await self.runner.maybe_run(running, policy)
            except asyncio.CancelledError:
                raise
            except Exception as run_error:  # retried with the next check; the refusal stands meanwhile
                log.warning("%s v%d: %s", release, installed.version, client.describe(run_error))
        recheck = convergence.OVER_BUDGET_RECHECK_S
        return recheck if wait is None else min(wait, recheck)

    async def _uninstall(self, release: str) -> None:
        installed = await self.installer.uninstall(release)
        self.dispatch.disarm(release)
        self.workers.retire_release(release, state_dir=self.state_dir)
        log.info("uninstalled %s", release)
        if installed is not None:
            await self.reporter.status(
                pb.DesiredTask(release=release, version=installed.version), S.DELIVERY_STATE_UNINSTALLED
            )
        await self.installer.gc()


async def _quietly(*closers: Callable[[], Awaitable[Any]] | None) -> None:
    """Await each closer in turn; one that fails is logged and the rest still run (a stopping agent)."""
    for close in closers:
        if close is not None:
            try:
                await close()
            except Exception as e:  # shutting down: nothing may stop the rest
                log.debug("closing %s failed: %s", getattr(close, "__qualname__", close), e)


async def _until_stopped(stopping: asyncio.Event, coro: Any) -> None:
    """Await `coro` until it ends or `stopping` is set (then cancel it); its exception, if it raised."""
    work = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, stop):
            t.cancel()
        await asyncio.gather(work, stop, return_exceptions=True)
    if work.done() and not work.cancelled() and work.exception() is not None:
        raise work.exception()


def _workers_and_slots(
    workers: warmpool.WorkerPool | warmpool.PoolSettings | None,
    task_slots: slots.FairSlots | int | None,
    state_dir: pathlib.Path,
    threads: int,
) -> tuple[bool, warmpool.WorkerPool, slots.FairSlots | None]:
    """Warm task workers (tether.agent.warmpool): a pool of the agent's own (True) unless one is shared with
    it (a simulated fleet); and the device-wide cap on concurrent runs (`--task-slots`), fair across tasks."""
    if isinstance(workers, warmpool.WorkerPool):
        return False, workers, slots.FairSlots(task_slots) if isinstance(task_slots, int) else task_slots
    pool = warmpool.WorkerPool(work_dir=state_dir, threads=threads, settings=workers or warmpool.PoolSettings())
    return True, pool, slots.FairSlots(task_slots) if isinstance(task_slots, int) else task_slots


def _refusal(e: Exception) -> bool:
    """A refusal stands wherever it was raised (a kept version's policy checked before a run, too)."""
    return isinstance(e, errors.VerificationFailed)


def _as_desired(installed: statefile.InstalledTask) -> pb.DesiredTask:
    """The task an installed version was announced as (its policy included)."""
    return pb.DesiredTask(
        release=installed.release,
        version=installed.version,
        manifest_digest=installed.manifest_digest,
        trigger_json=installed.trigger_json,
        resources_json=installed.resources_json,
    )


def _next_step(agent: Agent, release: str, task: pb.DesiredTask | None, policy_error: str | None) -> convergence.Step:
    """Describe what the agent knows of the release as frozen values; the planner picks the step."""
    now = time.monotonic()
    desired = None
    if task is not None:
        pull_at = agent.puller.notified.pull_at(release)
        desired = convergence.Desired(
            version=task.version,
            manifest_digest=task.manifest_digest,
            policy_error=policy_error,
            pull_at=pull_at,
            kept=pull_at is not None and pull_at > now and agent.installer.kept(task) is not None,
        )
    installed: convergence.Installed | None = None
    if (recorded := agent.state.installed.get(release)) is not None:
        installed = convergence.Installed(version=recorded.version, manifest_digest=recorded.manifest_digest)
    elif (on_disk := agent.store.current(release)) is not None:
        installed = convergence.Installed(version=on_disk)
    refused = agent.state.refused.get(release)
    return convergence.plan(
        desired,
        installed,
        None if not refused else convergence.Refused(version=refused.get("version")),
        None if task is None else agent.installer.blocked_view(task),
        now,
        failed=agent.installer.failed.get(release),
    )
