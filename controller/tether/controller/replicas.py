"""Several controller replicas on one Postgres: every release change reaches every connected agent.

An agent holds its Subscribe stream on whichever replica its load balancer
picked, and the release may change on any other. The database announces each
change: a trigger on `releases` (migration 0006) runs `pg_notify('tether_releases',
{"release", "version", "origin"})` inside the writing transaction, so the
announcement goes out exactly when, and only if, the change commits.

Each replica runs one `ReleaseListener` on a dedicated connection (a LISTEN
needs a session of its own; the pool's connections come and go). For every
announcement it reads the release as committed, compares it with the release
as this replica last saw it, and hands the pair to the same fan-out the local
ApplyRelease path uses (`fanout.FanOut.release_changed`: hub → Notify/Revoke, deliveries
marked). The comparison is what makes it safe to receive anything twice:
`fanout_action(r, r)` is NONE for every device.

A replica's own changes carry its `origin` (its pool sets the `tether.origin`
session setting, `with_origin`); ApplyRelease already fanned those out with
the exact before/after of its transaction, so the listener only records them.

Notifications are not queued for a listener that is not connected. So after
every (re)connect, and every `resync_s` seconds as a safety net, the listener
re-reads all live releases and fans out whatever differs from what it knew:
a missed notification delays a change by at most `resync_s`, never loses it.
Devices that connect later get everything in their opening Sync anyway.

Device revocations travel the same way on a second channel of the same
connection: a trigger on `devices` (migration 0008) runs
`pg_notify('tether_devices', {"device", "event": "revoked", "origin"})` in the
revoking transaction, and the listener hands the device id to `on_revoked`
(`fanout.FanOut.device_revoked`: forget its cached authentication, end its
Subscribe stream with UNAUTHENTICATED). That is idempotent, so it runs for
every announcement, this replica's own included. A revocation has no state to
diff later, so a gap is handled differently: after every (re)connect, once
LISTEN is in place and before anything else, `on_gap` runs
(`fanout.FanOut.end_revoked_streams`: clear the whole authentication cache, then one
query for the connected devices, ending the streams of revoked ones). If it
fails, the listener reconnects and runs it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import conninfo as conninfo_mod

from tether.controller import devices, instruments, release_cache, releases

log = logging.getLogger(__name__)

CHANNEL = "tether_releases"
DEVICES_CHANNEL = "tether_devices"
ORIGIN_SETTING = "tether.origin"

ChangeHandler = Callable[[releases.Release | None, releases.Release | None], Awaitable[None]]
RevokedHandler = Callable[[str], Awaitable[None]]
GapHandler = Callable[[], Awaitable[object]]
DeviceChangedHandler = Callable[[str, bool], Awaitable[None]]  # (device id, changed by this replica)


def new_replica_id() -> str:
    """Unique per controller process; safe inside a libpq `options` string (no spaces or quotes)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:40] or "controller"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def with_origin(conninfo: str, replica_id: str) -> str:
    """`conninfo` whose sessions set `tether.origin` to `replica_id` (keeps any existing `options`)."""
    params = conninfo_mod.conninfo_to_dict(conninfo)
    existing = str(params.get("options") or "").strip()
    params["options"] = (existing + " " if existing else "") + f"-c {ORIGIN_SETTING}={replica_id}"
    return conninfo_mod.make_conninfo("", **params)


class ReleaseListener:
    """LISTEN for release changes and device revocations made anywhere; act on them for this replica."""

    def __init__(
        self,
        *,
        conninfo: str,
        cache: release_cache.ReleaseCache,
        replica_id: str,
        on_change: ChangeHandler,
        on_revoked: RevokedHandler | None = None,
        on_gap: GapHandler | None = None,
        on_device_changed: DeviceChangedHandler | None = None,
        resync_s: float = 30.0,
        retry_s: float = 1.0,
        max_retry_s: float = 15.0,
        metrics: instruments.ControllerMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else instruments.ControllerMetrics()
        self._conninfo = conninfo
        self._cache = cache
        self.replica_id = replica_id
        self._on_change = on_change
        self._on_revoked = on_revoked
        self._on_gap = on_gap
        self._on_device_changed = on_device_changed
        self._resync_s = resync_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._known: dict[str, releases.Release] = {}
        self._seeded = False
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.remote_changes = 0  # changes fanned out on behalf of other replicas (and of resyncs)
        self.revocations = 0  # revocation announcements handled (this replica's own included)
        self.catch_ups = 0  # (re)connects after which missed revocations were looked for (`on_gap`)
        self.application_name = devices.listener_application_name(replica_id)  # in pg_stat_activity

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start listening; returns once the first LISTEN is in place (so no later change is missed)."""
        self._task = asyncio.create_task(self._run(), name="tether-release-listener")
        waiter = asyncio.ensure_future(self.listening.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            await self.stop()
            raise TimeoutError(f"the release listener could not LISTEN within {timeout:.0f}s")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.listening.clear()

    async def _run(self) -> None:
        delay = self._retry_s
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=self.application_name
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {DEVICES_CHANNEL}")
                    # Whatever was revoked while nobody listened: first, the authentication cache may be stale.
                    await self._catch_up_revocations()
                    await self._resync()  # whatever changed while nobody listened
                    self.listening.set()
                    delay = self._retry_s
                    while True:
                        async for note in conn.notifies(timeout=self._resync_s):
                            if note.channel == DEVICES_CHANNEL:
                                await self._handle_device(note.payload)
                            else:
                                await self._handle(note.payload)
                        await self._resync()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.listening.clear()
                log.warning(
                    "release listener lost its connection (%s: %s); retrying in %.1fs", type(e).__name__, e, delay
                )
                await asyncio.sleep(delay)
                delay = min(self._max_retry_s, delay * 2)

    async def _handle(self, payload: str) -> None:
        heard = time.monotonic()
        try:
            doc = json.loads(payload)
            name, origin = str(doc["release"]), str(doc.get("origin") or "")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed %s payload %r", CHANNEL, payload[:200])
            return
        self._cache.releases_changed()  # cached "may read" answers (release_cache)
        after = await self._cache.get_release(name)
        before = self._known.get(name)
        self._remember(name, after)
        if origin == self.replica_id or before == after:
            return  # fanned out by our own ApplyRelease, or nothing new for this replica
        await self._fan_out(before, after)
        self._metrics.replica_lag.observe(time.monotonic() - heard)

    async def _handle_device(self, payload: str) -> None:
        try:
            doc = json.loads(payload)
            device_id, event = str(doc["device"]), str(doc.get("event") or "revoked")
            origin = str(doc.get("origin") or "")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed %s payload %r", DEVICES_CHANNEL, payload[:200])
            return
        if event == "changed":  # credential or facts (migration 0009)
            if self._on_device_changed is not None:
                try:
                    await self._on_device_changed(device_id, origin == self.replica_id)
                except Exception:
                    log.exception("refreshing changed device %s failed", device_id)
            return
        if event != "revoked" or self._on_revoked is None:
            return
        self.revocations += 1
        try:
            await self._on_revoked(device_id)
        except Exception:
            log.exception("ending the streams of revoked device %s failed", device_id)

    async def _catch_up_revocations(self) -> None:
        """Runs after every LISTEN: an exception here makes the listener reconnect and try again."""
        if self._on_gap is not None:
            await self._on_gap()
            self.catch_ups += 1

    async def _resync(self) -> None:
        self._cache.releases_changed()
        current = {r.name: r for r in await self._cache.list_releases()}
        changed = [
            (self._known.get(n), current.get(n))
            for n in sorted(set(self._known) | set(current))
            if self._known.get(n) != current.get(n)
        ]
        for before, after in changed:
            name = (after or before).name  # type: ignore[union-attr]
            self._remember(name, after)
            if self._seeded:
                await self._fan_out(before, after)
        self._seeded = True

    def _remember(self, name: str, release: releases.Release | None) -> None:
        if release is None:
            self._known.pop(name, None)
        else:
            self._known[name] = release

    async def _fan_out(self, before: releases.Release | None, after: releases.Release | None) -> None:
        self.remote_changes += 1
        self._metrics.remote_changes.inc()
        try:
            await self._on_change(before, after)
        except Exception:
            # The devices concerned resync on their next reconnect; the listener must keep going.
            log.exception("fanning out a change of %s failed", (after or before).name)  # type: ignore[union-attr]
