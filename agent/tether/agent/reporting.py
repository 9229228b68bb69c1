"""What the agent tells the controller about itself: delivery states and backend choices.

Reports never stop the work they report on: a failure is logged, and a
terminal report (installed, succeeded, failed, refused, uninstalled) is kept
and retried until the controller acknowledges it (`Reporter`). Two rules live here so the agent
and the fleet simulator report alike:

- DOWNLOADING is sent only for an install still running after
  `DOWNLOADING_REPORT_AFTER_S` (`LateReport`); a quicker one goes from
  NOTIFIED straight to INSTALLED: one call and one database write less per
  device when a whole fleet installs.
- Backend choices (`BackendReports`) are sent in the background, one report
  at a time, whenever an install may have changed them, and again after a
  Sync when the last attempt failed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from tether.agent import backends, bundles, client, devicestate, participation, statefile
from tether.common import errors
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

DOWNLOADING_REPORT_AFTER_S = 1.0


def state_name(state: int) -> str:
    return pb.DeliveryState.Name(state).removeprefix("DELIVERY_STATE_")


class LateReport:
    """A progress report sent only if the work it describes is still going after `after_s`.

    `settle()` (in a `finally` around the work) cancels a report not yet begun,
    or waits for one already on its way, so it can never arrive after the
    report that ends the work (both carry the same version: the later write
    wins).
    """

    def __init__(self, send: Callable[[], Awaitable[None]], *, after_s: float | None = None) -> None:
        self._send = send
        self._after_s = DOWNLOADING_REPORT_AFTER_S if after_s is None else after_s
        self.sent = False
        self._task = asyncio.create_task(self._run(), name="late-report")

    async def _run(self) -> None:
        await asyncio.sleep(self._after_s)
        self.sent = True
        await self._send()

    async def settle(self) -> None:
        if not self.sent:
            self._task.cancel()
        # Wait without awaiting the task itself: a cancellation of the caller must reach the caller, not be
        # taken for the report's. A lost progress report changes nothing: its outcome is read and dropped.
        try:
            await asyncio.wait({self._task})
        except asyncio.CancelledError:
            self._task.cancel()  # the caller is going away (shutdown): so is its report
            raise
        if not self._task.cancelled():
            self._task.exception()


# Reports that end a piece of work: each is retried until the controller acknowledged it (or refused it
# for good), because nothing else would ever tell the controller. A later report on a release supersedes.
TERMINAL_STATES = frozenset(
    {
        pb.DeliveryState.DELIVERY_STATE_INSTALLED,
        pb.DeliveryState.DELIVERY_STATE_SUCCEEDED,
        pb.DeliveryState.DELIVERY_STATE_FAILED,
        pb.DeliveryState.DELIVERY_STATE_REFUSED,
        pb.DeliveryState.DELIVERY_STATE_UNINSTALLED,
    }
)


class Reporter:
    """ReportStatus for one device, with the device state (participation conditions) it can tell.

    A terminal report (`TERMINAL_STATES`) that fails for a reason retrying can cure
    (`client.RETRYABLE`: a disconnect, an overloaded controller) is kept, latest per release,
    and sent again with backoff and at every (re)connection (`resend`) until acknowledged.
    Reports are idempotent on the controller (the latest state per device), so sending one twice
    changes nothing.
    """

    def __init__(
        self,
        *,
        device: client.DeviceClient,
        probe: participation.StateProbe | None = None,
        backoff: client.Backoff = client.Backoff(),
        gate: devicestate.Conditions | None = None,
    ) -> None:
        self._client = device
        self._gate = gate  # the agent's device state and waiting releases (tether.agent.devicestate)
        self._probe = gate.state if gate is not None else probe  # None: the device tells nothing (the simulator)
        self._backoff = backoff
        self.unacked: dict[str, tuple[pb.DesiredTask, int, str]] = {}  # release -> its latest unacknowledged report
        self._last: dict[str, tuple[pb.DesiredTask, int, str]] = {}  # release -> its latest report
        self._held: dict[str, str] = {}  # release -> why it waits for its participation conditions
        # release -> URL failures not yet acknowledged by the controller, by reason (url_failures.REASONS)
        self.url_failures: dict[str, collections.Counter[str]] = {}
        self._retry: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def device_state(self) -> dict[str, str]:
        if self._probe is None:
            return {}
        try:
            return {k: str(v) for k, v in self._probe().items() if k in participation.REPORTED_KEYS}
        except Exception as e:  # a probe must never stop the agent
            log.debug("device state probe failed: %s", e)
            return {}

    async def hold(self, release: str, conditions: dict[str, bool]) -> str:
        """Why `release` may not run now under its participation conditions ("" when it may).

        When the reason changes, the release's last report is sent again (same state, same message) with
        the new device state: the controller learns at once who waits and why, and nothing regresses.
        """
        if self._gate is None:
            return "" if participation.met(conditions, self.device_state()) else "conditions not met"
        reason = self._gate.hold(release, conditions)
        if self._held.get(release, "") != reason and (last := self._last.get(release)) is not None:
            await self._send(*last)
        self._held[release] = reason
        return reason

    def note_url_failure(self, release: str, reason: str) -> None:
        """A blob URL of `release` did not deliver (the puller fell back to gRPC): sent with its next report."""
        self.url_failures.setdefault(release, collections.Counter())[reason] += 1

    async def status(self, task: pb.DesiredTask, state: int, message: str = "") -> None:
        """ReportStatus; never raises: a lost report must not stop the work it reports on (terminal ones are kept)."""
        self._last[task.release] = (task, state, message)
        if state in TERMINAL_STATES:
            self.unacked[task.release] = (task, state, message)
        elif (kept := self.unacked.get(task.release)) is not None and kept[0].version < task.version:
            self.unacked.pop(task.release, None)  # superseded by progress on a newer version
        if not await self._send(task, state, message) and task.release in self.unacked:
            self._schedule_retry()

    async def _send(self, task: pb.DesiredTask, state: int, message: str) -> bool:
        """One attempt; True when the report needs no resend (acknowledged, refused for good, or superseded)."""
        failures = dict(self.url_failures.get(task.release) or {})
        try:
            await self._client.report_status(
                release=task.release,
                version=task.version,
                state=state,  # type: ignore[arg-type]
                message=message,
                device_state=self.device_state(),
                url_failures=failures,
            )
            if failures:  # acknowledged: counted once; newer failures stay for the next report
                left = self.url_failures[task.release]
                left.subtract(failures)
                if not +left:
                    del self.url_failures[task.release]
        except Exception as e:
            log.debug("report %s %s v%d failed: %s", state_name(state), task.release, task.version, e)
            if client.is_retryable(e):
                return False
        if self.unacked.get(task.release) == (task, state, message):
            del self.unacked[task.release]
        return True

    async def resend(self) -> None:
        """Send every unacknowledged terminal report again (on a new connection, and by the retry task)."""
        for task, state, message in list(self.unacked.values()):
            if self.unacked.get(task.release) == (task, state, message):
                await self._send(task, state, message)

    def connected(self) -> None:
        """A stream is open again: resend what was not acknowledged, now."""
        if self.unacked:
            self._schedule_retry(at_once=True)

    def _schedule_retry(self, *, at_once: bool = False) -> None:
        if self._retry is not None and not self._retry.done():
            if not at_once:
                return
            self._retry.cancel()
        self._retry = asyncio.create_task(self._retry_loop(at_once=at_once), name="report-retry")

    async def _retry_loop(self, *, at_once: bool) -> None:
        attempt = 0 if at_once else 1
        while self.unacked:
            if attempt:
                await asyncio.sleep(self._backoff.delay(attempt - 1, self._rng))
            attempt += 1
            await self.resend()

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop retrying (the agent stops); returns the task to await, if any."""
        if self._retry is not None:
            self._retry.cancel()
        return self._retry

    def downloading(self, task: pb.DesiredTask) -> LateReport:
        """DOWNLOADING for `task`, if its install is still going after a while; `settle()` it when done."""
        return LateReport(lambda: self.status(task, pb.DeliveryState.DELIVERY_STATE_DOWNLOADING))


class BackendReports:
    """ReportBackends: the backend chosen for each installed model, sent when it may have changed."""

    def __init__(
        self,
        *,
        device: client.DeviceClient,
        selector: backends.Selector,
        state: statefile.AgentState,
        store: bundles.BundleStore,
        stopping: asyncio.Event,
    ) -> None:
        self._client = device
        self._selector = selector
        self._state = state
        self._store = store
        self._stopping = stopping
        self._dirty = True  # choices the controller has not heard of yet
        self._task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        """An install may have changed the choices: tell the controller soon."""
        self._dirty = True
        self.soon()

    def soon(self) -> None:
        """Tell the controller the current choices (best effort, in the background, one report at a time)."""
        if not self._dirty:
            return
        if self._task is not None and not self._task.done():
            return  # the running report re-checks the dirty flag when it finishes
        self._task = asyncio.create_task(self._report(), name="report-backends")

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop a report under way; returns its task to await."""
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def _report(self) -> None:
        while self._dirty and not self._stopping.is_set():
            self._dirty = False
            try:
                device_profile = await self._selector.profile()
                choices = self._choices(device_profile.fingerprint)
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
                self._dirty = True
                log.debug("reporting backend choices failed: %s", client.describe(e))
                return

    def _choices(self, fingerprint: Any) -> dict[str, pb.BackendChoice]:
        choices: dict[str, pb.BackendChoice] = {}
        for release, installed in sorted(self._state.installed.items()):
            try:
                bundle = self._store.installed_manifest(release, installed.version)
            except (OSError, errors.TetherError):
                continue
            for spec in backends.specs_for(bundle, path_of=lambda f: f.path):
                sel = self._selector.cache.get(spec.key, fingerprint)
                if sel is not None and spec.key not in choices:
                    choices[spec.key] = pb.BackendChoice(
                        model_key=spec.key,
                        candidate=sel.chosen.key,
                        latency_ms=sel.latency_ms,
                        release=release,
                        model=spec.name,
                    )
        return choices
