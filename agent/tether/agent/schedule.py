"""When a task runs: the trigger a release carries in `trigger_json` (pure parsing and timing).

    {"type": "onInstall"}                                   once per installed version (the default)
    {"type": "interval", "seconds": 300}                    every 300 s
    {"type": "cron", "schedule": "*/15 * * * *", "timezone": "UTC"}
    {"type": "onDemand"}                                    only when the controller sends RunNow
    {"type": "pattern", "pattern": {...}, "cooldownSeconds": 60}
                                                            when the on-device event stream matches

Every type may add a stream window and aggregations that become the task's
`ctx.inputs` (`"window": {...}, "aggregate": [...]`, see
`tether.agent.stream.windows`); a pattern trigger's inputs also carry the match.
Whatever the type, the controller can run an installed task on demand
(RunNow); "onDemand" only means nothing else does.

A document this agent cannot honour exactly (unknown type or key, bad value)
raises InvalidSpec naming the field, and the daemon refuses that version
before downloading anything. The parser (`Trigger`) is pure and lives in
`tether.spec.triggers`, so the operator and the controller validate triggers
with it at apply time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tether.agent.stream import processor
from tether.spec import jsontext
from tether.spec.triggers import Trigger

# ---------------------------------------------------------------- the agent side: armed triggers and pending runs

MAX_PENDING = 32  # per release: fires beyond this are dropped (and counted) until the task catches up
MAX_PAYLOAD_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class PendingRun:
    """A run owed to a release: a pattern match or an on-demand request, with its `ctx.inputs`."""

    trigger: str  # "pattern" | "onDemand"
    version: int  # 0: whatever version is installed when it runs
    inputs: Mapping[str, Any]
    request_id: str = ""  # on-demand: the controller's id, so a repeated request runs once


class Dispatcher:
    """Which releases have armed triggers, and which runs they are owed (the daemon drives it).

    `arm` is called with each version's parsed trigger before it runs: a
    pattern trigger is registered with the stream processor (replacing the
    previous version's), and the time it was armed anchors cron schedules.
    Pattern matches and on-demand requests queue a `PendingRun` and call
    `kick(release)`; the release's loop `take`s them and runs each once.
    """

    def __init__(
        self,
        stream: processor.StreamProcessor,
        *,
        clock: Any,
        kick: Any,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.kick = kick
        self.dropped = 0
        self._armed: dict[str, tuple[int, Trigger, float]] = {}  # release -> (version, trigger, armed_at)
        self._pending: dict[str, list[PendingRun]] = {}
        stream.on_match = self._on_match

    def arm(self, release: str, version: int, trigger: Trigger) -> float:
        """Watch `trigger` for this version (idempotent); returns when it was armed."""
        current = self._armed.get(release)
        if current is not None and current[0] == version and current[1] == trigger:
            return current[2]
        armed_at: float = self.clock()
        self._armed[release] = (version, trigger, armed_at)
        if trigger.type == "pattern" and trigger.stream is not None:
            self.stream.register(release, trigger.stream)
        else:
            self.stream.unregister(release)
        self._pending[release] = [p for p in self._pending.get(release, []) if p.version in (0, version)]
        return armed_at

    def disarm(self, release: str) -> None:
        self._armed.pop(release, None)
        self._pending.pop(release, None)
        self.stream.unregister(release)

    def armed_at(self, release: str) -> float | None:
        current = self._armed.get(release)
        return None if current is None else current[2]

    def _queue(self, release: str, run: PendingRun) -> None:
        queue = self._pending.setdefault(release, [])
        if run.request_id and any(p.request_id == run.request_id for p in queue):
            return
        if len(queue) >= MAX_PENDING:
            self.dropped += 1
            return
        queue.append(run)
        self.kick(release)

    def _on_match(self, release: str, fire: processor.Fire) -> None:
        armed = self._armed.get(release)
        if armed is None:
            return
        version, trigger, _ = armed
        inputs = self.stream.inputs_for(trigger.stream, now=fire.match.end, fire=fire)
        inputs["trigger"] = {"type": "pattern", "firedAt": fire.match.end}
        self._queue(release, PendingRun("pattern", version, inputs))

    def on_demand(self, *, release: str, version: int, request_id: str, payload_json: str) -> str | None:
        """Queue a controller's RunNow; returns why it was ignored, or None."""
        if len(payload_json) > MAX_PAYLOAD_BYTES:
            return f"payload larger than {MAX_PAYLOAD_BYTES} bytes"
        try:
            payload = jsontext.loads(payload_json) if payload_json.strip() else {}
        except ValueError as e:
            return f"payload is not valid JSON: {e}"
        inputs: dict[str, Any] = {
            "trigger": {"type": "onDemand", "firedAt": self.clock(), "requestId": request_id},
            "payload": payload,
        }
        self._queue(release, PendingRun("onDemand", version, inputs, request_id=request_id))
        return None

    def take(self, release: str, version: int) -> list[PendingRun]:
        """The runs owed to this version, oldest first (removed from the queue)."""
        queue = self._pending.pop(release, [])
        return [p for p in queue if p.version in (0, version)]

    def next(self, release: str, version: int) -> PendingRun | None:
        """The oldest run owed to this version, removed from the queue (None when none is)."""
        queue = self._pending.get(release, [])
        while queue:
            pending = queue.pop(0)
            if pending.version in (0, version):
                return pending
        return None

    def scheduled_inputs(self, trigger: Trigger, *, now: float) -> dict[str, Any]:
        """`ctx.inputs` of a run the trigger itself started (onInstall, interval, cron)."""
        inputs = self.stream.inputs_for(trigger.stream, now=now) if trigger.stream is not None else {}
        inputs["trigger"] = {"type": trigger.type, "firedAt": now}
        return inputs
