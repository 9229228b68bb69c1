"""What each subject's poll fetches and turns into a snapshot (the fan-out hub calls `Subjects.fetch`).

`tasks`: every MLTask as rows. `task:<ns>/<name>`: the MLTask, its release's status (stages with
live counts, the aggregate, the federated rounds when there are any) and its events, plus the
coverage history this process has sampled (one poll per subject, so one writer per history).
`fleet`: the device inventory (filtered per page, not per poll).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tether.common import errors
from tether.dashboard import rounds_view, upstream, views

MAX_TRACKED_TASKS = 256  # coverage histories kept (least recently sampled dropped first)


def task_subject(namespace: str, name: str) -> str:
    return f"task:{namespace}/{name}"


class Subjects:
    def __init__(self, source: upstream.Upstream, *, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock
        self._history: dict[str, tuple[views.Sample, ...]] = {}

    async def fetch(self, subject: str) -> dict[str, Any]:
        if subject == "tasks":
            return {"rows": views.task_rows(await upstream.gather_tasks(self._source))}
        if subject == "fleet":
            return {"devices": await self._source.devices(), "at": self._clock()}
        if subject.startswith("task:") and "/" in subject:
            namespace, name = subject[len("task:") :].split("/", 1)
            return await self._task(namespace, name)
        raise errors.NotFound(f"no such subject {subject!r}")

    async def _task(self, namespace: str, name: str) -> dict[str, Any]:
        obj = await self._source.task(namespace, name)
        status = obj.get("status") or {}
        release_name = str(status.get("release") or f"{namespace}/{name}")
        release, events = await asyncio.gather(self._source.release(release_name), self._source.events(namespace, name))
        health = release.health if release is not None else None
        key = f"{namespace}/{name}"
        history = views.extend(self._history.pop(key, ()), views.sample(self._clock(), status, health))
        self._history[key] = history
        while len(self._history) > MAX_TRACKED_TASKS:
            self._history.pop(next(iter(self._history)))
        fl = rounds_view.view(release.federated if release is not None else None, status)
        return {
            "row": views.task_row(obj),
            "message": str((status.get("rollout") or {}).get("message") or ""),
            "stages": views.stage_rows(status, health),
            "events": views.event_rows(events),
            "plot": views.coverage_plot(status, health, history),
            "federated": fl,
            "federated_plot": fl.plot() if fl is not None else None,
            "aggregate_round": release.aggregate_round if release is not None else 0,
            "aggregate": views.aggregate_table(release.aggregate if release is not None else None),
            "release": None
            if release is None
            else {
                "version": release.version,
                "targeted": release.targeted,
                "notified": release.notified,
                "installed": release.installed,
                "succeeded": release.succeeded,
                "failed": release.failed,
                "refused": release.refused,
                "results": release.results,
                "connected": release.connected_devices,
            },
        }
