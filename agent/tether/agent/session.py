"""The device's session with the controller: enrolment, credential renewal, and the Subscribe stream.

A device enrols once with its bootstrap token (the credential is kept in
`state.json`), then holds the `Subscribe` stream, reconnecting with jittered
exponential backoff. The stream opens with a `Sync` of the desired state, so
a device that was offline catches up; what the events mean is the caller's
business (`on_event`).

The credential carries its expiry (`tether.common.credentials`): while the
stream runs, a renewal loop sleeps until about two thirds of the remaining
lifetime have passed (with jitter, so a fleet enrolled at once does not renew
at once), calls `RenewCredential` and stores the new credential before using
it. A transient failure is retried with backoff (the credential keeps working
meanwhile); UNAUTHENTICATED (expired while the device was off, or superseded)
falls back to enrolling again with the bootstrap token; a credential without
an expiry (an older controller) is left alone.

The real agent and the fleet simulator (`tether.devtools.simagent`) both run
this code; the simulator keeps its state in memory and counts failures through
its `CallObserver` instead of logging them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import grpc

from tether.agent import client, statefile
from tether.common import credentials, errors
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

RENEW_MIN_DELAY_S = 1.0
RENEW_POLL_S = 5.0
RENEW_RETRY_S = (2.0, 300.0)  # first and longest wait between failed renewals
RENEW_JITTER = 0.1


def renewal_delay(*, remaining_s: float, jitter: float) -> float:
    """Seconds to wait before renewing a credential with `remaining_s` left (`jitter` in [0, 1))."""
    return max(RENEW_MIN_DELAY_S, remaining_s * 2.0 / 3.0 * (1.0 - RENEW_JITTER * jitter))


def new_device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:16]}"


class LogFailures:
    """The agent's CallObserver: says what failed in the log, at a level that fits."""

    def __init__(self, *, bootstrap_token: str) -> None:
        self._bootstrap_token = bootstrap_token

    def failed(self, what: str, error: grpc.aio.AioRpcError, *, release: str = "") -> None:
        code = error.code()
        if what == "Enroll":
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.error("enrolment refused: %s (check the bootstrap token)", error.details())
            else:
                log.warning("enrolment failed: %s %s", code.name, error.details())
        elif what == "Subscribe":
            if code == grpc.StatusCode.UNAUTHENTICATED and self._bootstrap_token:
                log.warning("credential rejected (%s); enrolling again", error.details())
            else:
                log.info("stream lost: %s %s", code.name, error.details())
        else:
            log.info("%s: %s broke (%s); resuming", release, what, client.describe(error))


class Session:
    """One device's enrolment, credential and event stream. `state` holds the device id and credential."""

    def __init__(
        self,
        *,
        device: client.DeviceClient,
        state: statefile.AgentState,
        persist: Callable[[], Awaitable[None]],
        describe: Callable[[], Awaitable[pb.DeviceInfo]],
        bootstrap_token: str,
        backoff: client.Backoff,
        rng: random.Random,
        clock: Callable[[], float] = time.time,
        observer: client.CallObserver | None = None,
        give_up: Callable[[grpc.aio.AioRpcError], bool] = lambda e: False,
    ) -> None:
        self.client = device
        self.state = state
        self.bootstrap_token = bootstrap_token
        self.backoff = backoff
        self.connected = asyncio.Event()  # set while the Subscribe stream is open
        self.stopping = asyncio.Event()
        self._persist = persist
        self._describe = describe
        self._rng = rng
        self._clock = clock
        self._observer = observer or LogFailures(bootstrap_token=bootstrap_token)
        self._give_up = give_up  # an enrolment error not worth retrying (the simulator's choice)

    async def sleep(self, seconds: float) -> None:
        """Sleep, returning early once stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    # ------------------------------------------------------------ enrolment
    async def enrol_with_retry(self) -> None:
        attempt = 0
        # Also checks stopping: grpc.aio can swallow a cancel, and once stopping `sleep` returns at once.
        while not self.state.credential and not self.stopping.is_set():
            try:
                await self.enrol()
            except grpc.aio.AioRpcError as e:
                if self._give_up(e):
                    raise
                self._observer.failed("Enroll", e)
                await self.sleep(self.backoff.delay(attempt, self._rng))
                attempt += 1

    async def enrol(self) -> None:
        if not self.bootstrap_token:
            raise errors.FailedPrecondition("this device is not enrolled and has no bootstrap token")
        info = await self._describe()
        response = await self.client.enroll(bootstrap_token=self.bootstrap_token, device=info)
        self.state.device_id = response.device_id or info.device_id
        self.state.credential = response.credential
        self.client.credential = response.credential
        await self._persist()
        log.info("enrolled as %s (backends %s)", self.state.device_id, ",".join(info.backends))

    # ------------------------------------------------------------ the stream
    async def hold(
        self,
        *,
        on_event: Callable[[pb.ServerEvent], None],
        installed: Callable[[], Sequence[pb.DesiredTask]] = list,
        on_connected: Callable[[], None] = lambda: None,
        renew: bool = True,
    ) -> None:
        """Hold the stream until stopping, reconnecting with backoff; with `renew`, keep the credential fresh."""
        if not renew:
            await self._stream_forever(on_event, installed, on_connected)
            return
        renewal = asyncio.create_task(self.keep_fresh(), name=f"renew:{self.state.device_id}")
        try:
            await self._stream_forever(on_event, installed, on_connected)
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def _stream_forever(
        self,
        on_event: Callable[[pb.ServerEvent], None],
        installed: Callable[[], Sequence[pb.DesiredTask]],
        on_connected: Callable[[], None],
    ) -> None:
        attempt = 0
        while not self.stopping.is_set():
            if not self.state.credential:
                await self.enrol_with_retry()
            call = self.client.subscribe(installed())
            try:
                async for event in call:
                    if not self.connected.is_set():
                        attempt = 0
                        on_connected()
                        self.connected.set()
                    on_event(event)
                log.info("controller closed the stream")
            except grpc.aio.AioRpcError as e:
                self._observer.failed("Subscribe", e)
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and self.bootstrap_token:
                    self.state.credential = ""
                    await self._persist()
            finally:
                call.cancel()
                self.connected.clear()
            await self.sleep(self.backoff.delay(attempt, self._rng))
            attempt += 1

    # ------------------------------------------------------------ renewal
    async def keep_fresh(self) -> None:
        failures = 0
        # Checked on every turn, not left to cancellation alone: a cancel that lands as a gRPC call
        # completes can be swallowed by grpc.aio, and once stopping, `sleep` no longer waits.
        while not self.stopping.is_set():
            expires = credentials.expires_at(self.state.credential)
            if expires is None:
                await self.sleep(RENEW_POLL_S)  # enrolling, or a credential without expiry: look again soon
                continue
            wait = renewal_delay(remaining_s=expires - self._clock(), jitter=self._rng.random())
            if failures:
                wait = min(wait, min(RENEW_RETRY_S[1], RENEW_RETRY_S[0] * 2 ** min(failures - 1, 16)))
            await self.sleep(wait)
            if self.stopping.is_set():
                return
            if credentials.expires_at(self.state.credential) != expires:
                failures = 0
                continue  # enrolled again meanwhile (the stream saw UNAUTHENTICATED): plan anew
            try:
                await self.renew_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                level = logging.INFO if client.is_retryable(e) else logging.WARNING
                log.log(level, "credential renewal of %s failed: %s", self.state.device_id, e)

    async def renew_once(self) -> None:
        """Renew now; on UNAUTHENTICATED enrol again (with the bootstrap token). Raises what it could not fix."""
        presented = self.client.credential
        try:
            response = await self.client.renew_credential()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED or not self.bootstrap_token:
                raise
            if self.state.credential != presented:
                return  # the stream already enrolled again meanwhile
            log.warning("credential of %s cannot be renewed (%s); enrolling again", self.state.device_id, e.details())
            await self.enrol()
            return
        # The old credential stopped working when the controller answered: switch at once, then persist.
        self.state.credential = response.credential
        self.client.credential = response.credential
        await self._persist()
        log.info("renewed the credential of %s (valid until %d)", self.state.device_id, response.expires_at)
