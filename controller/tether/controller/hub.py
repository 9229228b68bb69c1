"""Registry of connected agent streams, and the push side of push-then-pull.

Each connected device has one bounded queue that its Subscribe stream drains.
Publishing never waits: when a device's queue is full the device is dropped
(its stream ends with UNAVAILABLE) rather than slowing everyone else down; the
agent reconnects and its opening Sync carries everything it missed, so no
event needs to be kept for it. A device that connects again replaces its
older stream (a half-open TCP connection must not keep receiving events).

Which devices hear about a release change is a pure decision
(`fanout_action`); the hub only applies it to the connections it holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import grpc

from tether.common import errors, tracing
from tether.controller import releases, rollouts
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import selectors

log = logging.getLogger(__name__)


class Action(enum.Enum):
    NONE = "none"
    NOTIFY = "notify"
    REVOKE = "revoke"


def fanout_action(*, before: releases.Release | None, after: releases.Release | None, facts: selectors.Facts) -> Action:
    """What a connected device with `facts` must hear when a release goes from `before` to `after`.

    `after` None (or deleted) means the release was deleted. A paused release
    pushes nothing new; unpausing pushes the current version again (agents
    ignore a version they already have).
    """
    was = before is not None and before.targets(facts)
    now = after is not None and after.targets(facts)
    if now and after is not None and not after.paused:
        news = before is None or before.deleted or before.paused or before.version != after.version or not was
        return Action.NOTIFY if news else Action.NONE
    if was and not now:
        return Action.REVOKE
    return Action.NONE


def desired_task(
    *,
    release: str,
    version: int,
    manifest_digest: str,
    trigger: Mapping[str, Any],
    resources: Mapping[str, Any],
    rollback: bool = False,
) -> pb.DesiredTask:
    """The wire form of one desired release, policy included (every Sync and Notify builds it here)."""
    return pb.DesiredTask(
        release=release,
        version=version,
        manifest_digest=manifest_digest,
        trigger_json=releases.policy_json(trigger),
        resources_json=releases.policy_json(resources),
        rollback=rollback,
    )


def served_task(served: rollouts.Served) -> pb.DesiredTask:
    """The wire form of a version a staged rollout serves (the current one, or the stable one)."""
    return desired_task(
        release=served.release,
        version=served.version,
        manifest_digest=served.manifest_digest,
        trigger=served.trigger,
        resources=served.resources,
        rollback=served.rollback,
    )


def _staged_change(
    before: releases.Release | None,
    after: releases.Release | None,
    facts: selectors.Facts,
    events: dict[tuple[int, str], tuple[pb.ServerEvent, rollouts.Served]],
) -> tuple[Action, pb.ServerEvent | None, rollouts.Served | None]:
    """A staged release's change for one device (`rollouts.change`), with its Notify built once per version."""
    change = rollouts.change(before=before, after=after, facts=facts)
    if change.revoke:
        return Action.REVOKE, None, None
    if change.notify is None:
        return Action.NONE, None, None
    served = change.notify
    if served.key not in events:
        notify = pb.Notify(task=served_task(served), sent_at_ms=int(time.time() * 1000))
        if tracing.active():  # the release's trace continues on the device
            notify.trace_context.update(tracing.inject())
        events[served.key] = (pb.ServerEvent(notify=notify), served)
    return Action.NOTIFY, *events[served.key]


@dataclasses.dataclass(frozen=True)
class Closed:
    """Sentinel ending a stream: the status it ends with, and why."""

    code: grpc.StatusCode
    reason: str


@dataclasses.dataclass(eq=False)
class Connection:
    """One live Subscribe stream. Identity matters (eq=False): a device may reconnect."""

    device_id: str
    facts: selectors.Facts
    queue: asyncio.Queue[pb.ServerEvent | Closed]
    closed: bool = False

    def close(self, code: grpc.StatusCode, reason: str) -> None:
        """End the stream soon: drop whatever is queued and leave only the sentinel."""
        if self.closed:
            return
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(Closed(code, reason))


@dataclasses.dataclass(frozen=True, kw_only=True)
class InlineManifest:
    """GetManifest's answer carried in a Notify: the same for every device, but for each device's blob URLs."""

    response: pb.GetManifestResponse
    # A device's own short-lived blob URLs (None: the store serves none, one message fits all).
    urls_for: Callable[[str], Mapping[str, str]] | None = None


def _with_blob_urls(event: pb.ServerEvent, urls: Mapping[str, str]) -> pb.ServerEvent:
    """A copy of a Notify event with one device's blob URLs in its manifest."""
    own = pb.ServerEvent()
    own.CopyFrom(event)
    own.notify.manifest.blob_urls.update(urls)
    return own


@dataclasses.dataclass(frozen=True)
class FanOut:
    notified: tuple[str, ...]
    revoked: tuple[str, ...]
    dropped: tuple[str, ...]
    # Staged rollouts: devices sent back to the stable version (an older one), by version.
    downgraded: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)


class Hub:
    """All connected devices of this controller process."""

    def __init__(self, *, queue_size: int = 64, pull_rate: float = 0.0, max_pull_spread_s: float = 120.0) -> None:
        """`pull_rate`: installs per second a fan-out plans for (`Notify.pull_spread_ms`); 0 spreads nothing."""
        if queue_size < 1:
            raise errors.InvalidArgument(f"queue_size must be positive, got {queue_size}")
        if pull_rate < 0 or max_pull_spread_s < 0:
            raise errors.InvalidArgument("pull_rate and max_pull_spread_s must not be negative")
        self._queue_size = queue_size
        self._pull_rate = pull_rate
        self._max_pull_spread_s = max_pull_spread_s
        self._connections: dict[str, Connection] = {}
        # Highest version fanned out per release: two concurrent applies may finish
        # their fan-outs in either order, and an older one must not follow a newer one.
        self._versions: dict[str, int] = {}
        self.dropped = 0  # streams ended because their queue overflowed (a process-lifetime counter)

    def __len__(self) -> int:
        return len(self._connections)

    def connect(self, *, device_id: str, facts: selectors.Facts) -> Connection:
        conn = Connection(device_id=device_id, facts=facts, queue=asyncio.Queue(maxsize=self._queue_size + 1))
        old = self._connections.get(device_id)
        if old is not None:
            old.close(grpc.StatusCode.ABORTED, "superseded by a newer connection of this device")
        self._connections[device_id] = conn
        return conn

    def disconnect(self, conn: Connection) -> None:
        """The stream ended (its `finally`): forget it, unless a newer stream already replaced it."""
        if self._connections.get(conn.device_id) is conn:
            del self._connections[conn.device_id]
        conn.closed = True

    def is_connected(self, device_id: str) -> bool:
        return device_id in self._connections

    def device_ids(self) -> list[str]:
        """The devices with a stream on this process now (a snapshot)."""
        return list(self._connections)

    def close_device(self, device_id: str, *, code: grpc.StatusCode, reason: str) -> bool:
        """End one device's stream now (it was revoked); True when it had one on this process."""
        conn = self._connections.pop(device_id, None)
        if conn is None:
            return False
        conn.close(code, reason)
        return True

    def update_facts(self, *, device_id: str, facts: selectors.Facts) -> None:
        """A connected device re-enrolled with new attributes: target it by what it says now."""
        conn = self._connections.get(device_id)
        if conn is not None:
            conn.facts = facts

    def offer(self, conn: Connection, event: pb.ServerEvent) -> bool:
        """Queue an event without waiting; a full queue drops the device (it resyncs on reconnect)."""
        if conn.closed:
            return False
        if conn.queue.qsize() >= self._queue_size:  # one slot stays free for the closing sentinel
            log.warning("device %s is too slow (%d events queued): dropping it", conn.device_id, conn.queue.qsize())
            self.dropped += 1
            if self._connections.get(conn.device_id) is conn:
                del self._connections[conn.device_id]
            conn.close(grpc.StatusCode.UNAVAILABLE, "event queue overflowed; reconnect to resync")
            return False
        conn.queue.put_nowait(event)
        return True

    def release_changed(
        self,
        *,
        before: releases.Release | None,
        after: releases.Release | None,
        manifest: InlineManifest | None = None,
        only: Collection[str] | None = None,
    ) -> FanOut:
        """Push Notify / Revoke to every connected device the change concerns.

        `manifest`: GetManifest's answer for `after`'s manifest, carried in the
        Notify (`Notify.manifest`) of the devices served `after`'s own version.
        `only`: just these devices (a federated round's participants); None: all.
        """
        subject = after if after is not None else before
        if subject is None:
            return FanOut(notified=(), revoked=(), dropped=())
        if after is not None:
            if after.version < self._versions.get(after.name, 0):
                return FanOut(notified=(), revoked=(), dropped=())  # a newer version was already pushed
            self._versions[after.name] = after.version
        notified: list[str] = []
        revoked: list[str] = []
        dropped: list[str] = []
        # The same small message for every device: built once, not once per connection.
        notify_event: pb.ServerEvent | None = None
        revoke_event: pb.ServerEvent | None = None
        # A staged rollout serves each device the current or the stable version (tether.controller.rollouts).
        staged = rollouts.staged(before) or rollouts.staged(after)
        staged_events: dict[tuple[int, str], tuple[pb.ServerEvent, rollouts.Served]] = {}
        downgraded: dict[int, list[str]] = {}
        # First who hears what; the events are offered once the number of devices told to pull is known.
        plan: list[tuple[Connection, Action, pb.ServerEvent, rollouts.Served | None]] = []
        for conn in list(self._connections.values()):
            if only is not None and conn.device_id not in only:
                continue
            staged_event: pb.ServerEvent | None = None
            served: rollouts.Served | None = None
            if staged:
                action, staged_event, served = _staged_change(before, after, conn.facts, staged_events)
            else:
                action = fanout_action(before=before, after=after, facts=conn.facts)
            if action is Action.NONE:
                continue
            if staged_event is not None:
                event = staged_event
            elif action is Action.NOTIFY:
                assert after is not None
                if notify_event is None:
                    task = desired_task(
                        release=after.name,
                        version=after.version,
                        manifest_digest=after.manifest_digest,
                        trigger=after.spec.trigger,
                        resources=after.spec.resources,
                    )
                    notify = pb.Notify(task=task, sent_at_ms=int(time.time() * 1000))
                    if tracing.active():  # the release's trace continues on the device
                        notify.trace_context.update(tracing.inject())
                    if manifest is not None:
                        notify.manifest.CopyFrom(manifest.response)
                    notify_event = pb.ServerEvent(notify=notify)
                event = notify_event
            else:
                if revoke_event is None:
                    revoke_event = pb.ServerEvent(revoke=pb.Revoke(release=subject.name))
                event = revoke_event
            plan.append((conn, action, event, served))
        spread_ms = self.pull_spread_ms(sum(1 for _, action, _, _ in plan if action is Action.NOTIFY))
        if spread_ms:
            for told in [notify_event, *(e for e, _ in staged_events.values())]:
                if told is not None:
                    told.notify.pull_spread_ms = spread_ms
        urls_for = manifest.urls_for if manifest is not None else None
        for conn, action, event, served in plan:
            if urls_for is not None and event is notify_event:  # each device its own blob URLs
                event = _with_blob_urls(event, urls_for(conn.device_id))
            offered = self.offer(conn, event)
            if not offered:
                dropped.append(conn.device_id)
            elif served is not None and served.rollback:
                downgraded.setdefault(served.version, []).append(conn.device_id)
            else:
                (notified if action is Action.NOTIFY else revoked).append(conn.device_id)
        return FanOut(
            notified=tuple(notified),
            revoked=tuple(revoked),
            dropped=tuple(dropped),
            downgraded={v: tuple(ids) for v, ids in downgraded.items()},
        )

    def pull_spread_ms(self, devices: int) -> int:
        """The window over which `devices` told at once should start pulling: devices / the planned rate."""
        if self._pull_rate <= 0 or devices <= 1:
            return 0
        return int(min(self._max_pull_spread_s, devices / self._pull_rate) * 1000)

    def connected_targeted(self, release: releases.Release) -> int:
        return sum(1 for conn in self._connections.values() if release.targets(conn.facts))

    def run_now(self, release: releases.Release, run: pb.RunNow) -> tuple[str, ...]:
        """Offer an on-demand RunNow to every connected device the release targets; the ids it was queued for.

        Devices without the release installed (not in the rollout's stage yet) ignore it.
        """
        event = pb.ServerEvent(run=run)
        return tuple(
            conn.device_id
            for conn in list(self._connections.values())
            if release.targets(conn.facts) and self.offer(conn, event)
        )

    def facts_of(self, device_id: str) -> selectors.Facts | None:
        """The facts of a device connected here (None when it is not)."""
        conn = self._connections.get(device_id)
        return None if conn is None else conn.facts

    def run_on(self, device_ids: Iterable[str], run: pb.RunNow) -> tuple[str, ...]:
        """Offer a RunNow to these devices where they are connected here; the ids it was queued for."""
        event = pb.ServerEvent(run=run)
        out = []
        for device_id in device_ids:
            conn = self._connections.get(device_id)
            if conn is not None and self.offer(conn, event):
                out.append(device_id)
        return tuple(out)

    def close_all(self, *, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, reason: str) -> None:
        """End every stream (shutdown): agents reconnect elsewhere and resync."""
        for conn in list(self._connections.values()):
            conn.close(code, reason)
        self._connections.clear()
