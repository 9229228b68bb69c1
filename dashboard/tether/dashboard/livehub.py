"""One upstream poll per subject, shared by every page that shows it (fan-out).

A *subject* is what a page watches: `tasks` (every MLTask), `task:<ns>/<name>` (one task with its
release status and events), `fleet` (the device inventory). The first subscriber of a subject
starts its poller; every later one shares it; the last one to leave stops it. Each poll's snapshot
goes to every subscriber's queue, which holds only the latest (a slow browser skips snapshots, it
never makes the hub buffer them). A page rendered while the subject is watched reuses the latest
snapshot; otherwise one fetch serves every request that arrives while it runs (single flight).
So the controller and the API server see one request per subject and interval, however many tabs
are open. The fetch function is injected (`subjects.Subjects.fetch`); the clock too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)
MAX_IDLE_SUBJECTS = 512  # snapshots kept of subjects nobody watches (oldest dropped first)

Fetch = Callable[[str], Awaitable[dict[str, Any]]]


@dataclasses.dataclass
class _Subject:
    subscribers: set[asyncio.Queue[dict[str, Any]]] = dataclasses.field(default_factory=set)
    latest: dict[str, Any] | None = None
    fetched_at: float = 0.0
    poller: asyncio.Task[None] | None = None
    inflight: asyncio.Future[dict[str, Any]] | None = None


class Hub:
    def __init__(self, fetch: Fetch, *, interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self.interval_s = interval_s
        self._clock = clock
        self._subjects: dict[str, _Subject] = {}
        self.fetches: dict[str, int] = {}  # upstream fetches per subject (tests and /healthz read it)

    def subjects(self) -> int:
        """Subjects the hub holds state for (watched or with a kept snapshot)."""
        return len(self._subjects)

    def watchers(self, subject: str) -> int:
        s = self._subjects.get(subject)
        return len(s.subscribers) if s else 0

    async def current(self, subject: str) -> dict[str, Any]:
        """The latest snapshot: reused while fresh (under one interval old), else fetched once for all callers."""
        s = self._subjects.setdefault(subject, _Subject())
        if s.latest is not None and self._clock() - s.fetched_at < self.interval_s:
            return s.latest
        try:
            return await self._fetch_once(subject, s)
        finally:
            self._prune()

    def _prune(self) -> None:
        """Forget subjects nobody watches beyond MAX_IDLE_SUBJECTS, and those that never fetched (a bad name)."""
        idle = [k for k, v in self._subjects.items() if not v.subscribers and v.inflight is None and v.poller is None]
        for key in [k for k in idle if self._subjects[k].latest is None]:
            del self._subjects[key]
        idle = sorted((k for k in idle if k in self._subjects), key=lambda k: self._subjects[k].fetched_at)
        for key in idle[: max(0, len(idle) - MAX_IDLE_SUBJECTS)]:
            del self._subjects[key]

    async def _fetch_once(self, subject: str, s: _Subject) -> dict[str, Any]:
        if s.inflight is not None:
            return await asyncio.shield(s.inflight)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        s.inflight = future
        try:
            self.fetches[subject] = self.fetches.get(subject, 0) + 1
            snapshot = await self._fetch(subject)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        else:
            s.latest, s.fetched_at = snapshot, self._clock()
            future.set_result(snapshot)
            return snapshot
        finally:
            s.inflight = None

    @contextlib.asynccontextmanager
    async def subscribe(self, subject: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue receiving each new snapshot of `subject` (the latest one only, if the reader lags)."""
        s = self._subjects.setdefault(subject, _Subject())
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)
        s.subscribers.add(queue)
        if s.poller is None or s.poller.done():
            s.poller = asyncio.create_task(self._poll(subject, s), name=f"dashboard-poll-{subject}")
        elif s.latest is not None:
            queue.put_nowait(s.latest)
        try:
            yield queue
        finally:
            s.subscribers.discard(queue)
            if not s.subscribers and s.poller is not None:
                s.poller.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await s.poller
                s.poller = None

    async def _poll(self, subject: str, s: _Subject) -> None:
        while s.subscribers:
            try:
                snapshot = await self._fetch_once(subject, s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the upstream is down: say so on the pages, keep polling
                log.warning("dashboard: fetching %s failed: %s", subject, e)
                snapshot = {"error": str(e) or type(e).__name__}
            for queue in list(s.subscribers):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(snapshot)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        for s in self._subjects.values():
            if s.poller is not None:
                s.poller.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await s.poller
