"""When a task runs: the trigger document a release carries in `trigger_json` (pure parsing and timing).

    {"type": "onInstall"}                                   once per installed version (the default)
    {"type": "interval", "seconds": 300}                    every 300 s
    {"type": "cron", "schedule": "*/15 * * * *", "timezone": "UTC"}
    {"type": "onDemand"}                                    only when the controller sends RunNow
    {"type": "pattern", "pattern": {...}, "cooldownSeconds": 60}
                                                            when the on-device event stream matches

Every type may add a stream window and aggregations that become the task's
`ctx.inputs` (`"window": {...}, "aggregate": [...]`, `tether.spec.streams`)
and participation conditions (`"conditions": {"charging": true}`,
`tether.agent.participation`).

One parser for everyone: the agent refuses a version whose trigger it cannot
honour with it (`tether.agent.schedule` re-exports `Trigger`), and the operator
(MLTask `spec.trigger`) and the controller (release specs) validate with it at
apply time, so a trigger that `kubectl apply` accepts is one every agent of
this version runs. Errors are `errors.InvalidSpec` whose `field` names the
offending part (`trigger.schedule`, `trigger.pattern.steps[0].type`).

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from tether.common import errors
from tether.spec import cron, jsontext, streams

MAX_TRIGGER_BYTES = 64 * 1024
MAX_INTERVAL_S = 366 * 86400
TYPES = ("onInstall", "interval", "cron", "onDemand", "pattern")
CONDITION_KEYS = ("charging", "unmeteredNetwork", "idle")  # participation conditions (tether.agent.participation)
_STREAM_KEYS = frozenset({"window", "aggregate"})
_COMMON_KEYS = frozenset({"conditions"})
_KEYS = {
    "onInstall": frozenset(),
    "interval": frozenset({"seconds"}),
    "cron": frozenset({"schedule", "timezone"}),
    "onDemand": frozenset(),
    "pattern": frozenset({"pattern", "cooldownSeconds"}),
}


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A parsed trigger. `stream` holds the pattern/window/aggregations (None when it has none)."""

    type: str = "onInstall"
    interval_s: float = 0.0
    cron: cron.CronSchedule | None = None
    stream: streams.StreamSpec | None = None

    @classmethod
    def from_json(cls, text: str) -> Trigger:
        """Parse `trigger_json` ("" means onInstall); InvalidSpec (field "trigger...") when malformed."""
        if not text.strip():
            return cls()
        if len(text) > MAX_TRIGGER_BYTES:
            raise errors.InvalidSpec(f"document larger than {MAX_TRIGGER_BYTES} bytes", field="trigger")
        try:
            doc = jsontext.loads(text)
        except ValueError as e:
            raise errors.InvalidSpec(f"not valid JSON: {e}", field="trigger") from None
        if not isinstance(doc, dict):
            raise errors.InvalidSpec("must be an object", field="trigger")
        return cls.from_doc(doc)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Trigger:
        """Parse a trigger document; InvalidSpec naming the field when it cannot be honoured exactly."""
        kind = doc.get("type", "onInstall")
        if kind not in _KEYS:
            raise errors.InvalidSpec(
                f"type {errors.excerpt(kind)} is not supported by this agent; supported are {list(TYPES)}",
                field="trigger",
            )
        unknown = set(doc) - {"type"} - _KEYS[kind] - _STREAM_KEYS - _COMMON_KEYS
        if unknown:
            raise errors.InvalidSpec(f"unknown keys {sorted(unknown)} for type {errors.excerpt(kind)}", field="trigger")
        if "conditions" in doc:
            check_conditions(doc["conditions"])
        stream = None
        if kind == "pattern" or set(doc) & _STREAM_KEYS:
            stream = streams.StreamSpec.from_trigger(doc, require_pattern=kind == "pattern")
        if kind == "interval":
            seconds = doc.get("seconds")
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
                or not 1 <= seconds <= MAX_INTERVAL_S
            ):
                raise errors.InvalidSpec(
                    f"interval seconds must be a number in [1, {MAX_INTERVAL_S}], got {errors.excerpt(seconds)}",
                    field="trigger.seconds",
                )
            return cls("interval", float(seconds), stream=stream)
        if kind == "cron":
            timezone = doc.get("timezone", "UTC")
            if not isinstance(timezone, str):
                raise errors.InvalidSpec("must be a time zone name", field="trigger.timezone")
            return cls("cron", cron=cron.CronSchedule.parse(doc.get("schedule"), timezone=timezone), stream=stream)
        return cls(kind, stream=stream)

    @property
    def scheduled(self) -> bool:
        return self.type in ("interval", "cron")

    def next_due(self, *, last_run: float | None, armed_at: float) -> float | None:
        """When an interval/cron trigger fires next, as a timestamp (None for the other types).

        interval: `last_run + seconds`, or right away when it never ran. cron: the
        first firing after the later of the last run and `armed_at` (when the
        agent started watching this version): firings missed while the agent was
        down are not made up.
        """
        if self.type == "interval":
            return armed_at if last_run is None else last_run + self.interval_s
        if self.type == "cron" and self.cron is not None:
            after = armed_at if last_run is None else max(last_run, armed_at)
            return self.cron.next_after(after)
        return None


def check_conditions(conditions: Any, *, field: str = "trigger.conditions") -> None:
    """Participation conditions: an object of known keys with boolean values."""
    if not isinstance(conditions, Mapping):
        raise errors.InvalidSpec("must be an object", field=field)
    for key, value in conditions.items():
        if key not in CONDITION_KEYS:
            raise errors.InvalidSpec(f"unknown condition; allowed are {list(CONDITION_KEYS)}", field=f"{field}.{key}")
        if not isinstance(value, bool):
            raise errors.InvalidSpec(f"must be true or false, got {errors.excerpt(value)}", field=f"{field}.{key}")


# What a device reports about its waiting releases, beside its participation state (`device_state["waiting"]`):
# written by the agent (tether.agent.participation), read by the controller (stage health, the inventory).
WAITING_KEY = "waiting"
MAX_WAITING_CHARS = 500


def waiting_summary(waiting: Mapping[str, str]) -> str:
    """The releases held back and why, in one bounded string: "ns/a: not charging | ns/b: idle unknown"."""
    text = " | ".join(f"{release}: {reason}" for release, reason in sorted(waiting.items()) if reason)
    return text if len(text) <= MAX_WAITING_CHARS else text[: MAX_WAITING_CHARS - 1] + "…"


def waiting_releases(summary: str) -> frozenset[str]:
    """The release names of a `waiting_summary` (an entry cut by the length bound may be missing)."""
    return frozenset(part.split(": ", 1)[0].strip() for part in summary.split(" | ") if ": " in part)
