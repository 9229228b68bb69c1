"""The daemon's tunnel: grants for task runs, checked emits into the outbox, the uplink.

`Tunnel.emit` is the one way in, for task workers (through `emitsocket`) and
for the agent itself (stream-processor outputs, in-process): the topic is
checked, the payload's size, then the device's token buckets (records/s and
bytes/s, `tether.spec.emits`), and only then is the record committed to the
outbox and the uplink woken. A refusal raises `LimitExceeded` naming the
limit (or InvalidArgument for a topic), is counted per release and limit in
`refused`, and, at most once a minute per release, logged and reported
upstream as a record on `tether.refusals` (`{"release", "limit", "message",
"refused": {limit: count}}`); nothing else in the agent notices.

`grant(release)` is what a run's job document carries so the worker's
`ctx.emit` can reach the socket: the socket path, a random token standing
for the release (records name the release that emitted them) and the payload
limit (checked in the worker before anything is sent).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import pathlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from tether.agent import client
from tether.agent.tunnel import emitsocket, uplink
from tether.agent.tunnel.outbox import Outbox
from tether.common import errors
from tether.spec import emits

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"
_WORKER_LIMITS = frozenset({emits.LIMIT_PAYLOAD})  # what a worker may report having refused itself
# Where the agent reports refused emits (the first of each minute per release, with the counts so far).
REFUSALS_TOPIC = "tether.refusals"


class Tunnel:
    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str],
        send: uplink.SendBatch,
        limits: emits.TunnelLimits = emits.TunnelLimits(),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        connected: asyncio.Event | None = None,
        backoff: client.Backoff = client.Backoff(initial_s=0.2, max_s=30.0),
        serve_socket: bool = True,
        enabled: bool = True,
    ) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.limits = limits
        self._monotonic = monotonic
        self.outbox = Outbox(self.state_dir / OUTBOX_FILE, max_bytes=limits.max_outbox_bytes, clock=clock)
        self._records, self._bytes = limits.device_buckets(monotonic())
        self.uplink = uplink.Uplink(outbox=self.outbox, send=send, limits=limits, backoff=backoff, connected=connected)
        self._serve_socket = serve_socket
        self.enabled = enabled  # False: an agent run without a tunnel (nothing starts; ctx.emit is unavailable)
        self._server: emitsocket.EmitServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._tokens: dict[str, str] = {}  # token -> release
        self._by_release: dict[str, str] = {}
        self.accepted = 0
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()  # (release, limit)
        self._logged_at: dict[str, float] = {}

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if not self.enabled:
            return
        await asyncio.to_thread(self.outbox.open)
        if self._serve_socket:
            path, tmp = emitsocket.socket_path_for(self.state_dir)
            self._server = emitsocket.EmitServer(
                path,
                accept=self._accept_token,
                refused=self._refused_in_worker,
                max_payload_bytes=self.limits.max_payload_bytes,
                tmp_dir=tmp,
            )
            await self._server.start()
        self._task = asyncio.create_task(self.uplink.run(), name="tether-tunnel-uplink")
        if len(self.outbox):
            log.info("tunnel: %d records from before a restart wait for the controller", len(self.outbox))
            self.uplink.wake()

    async def stop(self) -> None:
        """Stop the uplink and the socket, close the outbox; never raises (the agent is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._server is not None:
            try:
                await self._server.stop()
            except Exception:
                log.warning("tunnel: stopping the emit socket failed", exc_info=True)
            self._server = None
        self.outbox.close()

    # ------------------------------------------------------------ emits
    def grant(self, release: str) -> dict[str, Any] | None:
        """The job document's `emit` part for a run of `release` (None when no socket is served)."""
        if self._server is None:
            return None
        token = self._by_release.get(release)
        if token is None:
            token = secrets.token_hex(16)
            self._tokens[token] = release
            self._by_release[release] = token
        return {
            "socket": str(self._server.path),
            "token": token,
            "max_payload_bytes": self.limits.max_payload_bytes,
        }

    def _accept_token(self, token: str, topic: str, payload: bytes) -> int:
        release = self._tokens.get(token)
        if release is None:
            raise errors.PermissionDenied("unknown emit token (not a run of this agent)")
        return self.emit(topic, payload, release=release)

    def _refused_in_worker(self, token: str, limit: str, message: str) -> None:
        release = self._tokens.get(token)
        if release is not None and limit in _WORKER_LIMITS:
            self._refuse(release, limit, emits.LimitExceeded(limit, message.split(": ", 1)[-1]))

    def emit(self, topic: str, payload: bytes, *, release: str = "") -> int:
        """Check and commit one record; its seq. LimitExceeded / InvalidArgument say why not."""
        if not self.enabled:
            raise errors.FailedPrecondition("this agent runs no real-time tunnel")
        try:
            emits.check_topic(topic)
            emits.check_payload(len(payload), self.limits)
            emits.take_both(self._records, self._bytes, count=1, nbytes=len(payload), now=self._monotonic())
            seq = self.outbox.append(topic=topic, payload=payload, release=release)
        except emits.LimitExceeded as e:
            self._refuse(release, e.limit, e)
            raise
        except errors.InvalidArgument as e:
            self._refuse(release, "topic", e)
            raise
        self.accepted += 1
        self.uplink.wake()
        return seq

    def _refuse(self, release: str, limit: str, e: Exception) -> None:
        """Count it; at most once a minute per release, log it and report it upstream on REFUSALS_TOPIC."""
        self.refused[(release, limit)] += 1
        now = self._monotonic()
        if now - self._logged_at.get(release, -1e9) < 60:
            return
        self._logged_at[release] = now
        log.warning("tunnel: emit of %s refused: %s", release or "the agent", e)
        counts = {lim: n for (rel, lim), n in self.refused.items() if rel == release}
        report = {"release": release, "limit": limit, "message": str(e)[:500], "refused": counts}
        # Outside the device's buckets (one small record a minute per release), within the outbox bound.
        with contextlib.suppress(emits.LimitExceeded):
            self.outbox.append(topic=REFUSALS_TOPIC, payload=json.dumps(report).encode(), release=release)
            self.uplink.wake()

    def stats(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "pending": len(self.outbox),
            "pending_bytes": self.outbox.pending_bytes,
            "sent": self.uplink.sent,
            "duplicates": self.uplink.duplicates,
            "dropped": self.uplink.dropped,
            "refused": {f"{r or '-'}:{lim}": n for (r, lim), n in sorted(self.refused.items())},
            "last_error": self.uplink.last_error,
        }


def for_agent(
    state_dir: pathlib.Path,
    send: uplink.SendBatch,
    limits: emits.TunnelLimits | None,
    connected: asyncio.Event,
) -> Tunnel:
    """The daemon's tunnel: its state directory, its channel's `emit`, uploading while connected.

    `limits` None: a disabled tunnel (no outbox, no socket; `ctx.emit` raises EmitRefused).
    """
    return Tunnel(
        state_dir=state_dir,
        send=send,
        limits=limits or emits.TunnelLimits(),
        connected=connected,
        enabled=limits is not None,
    )
