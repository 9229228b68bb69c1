"""Windows over the event stream and per-key aggregations: what a trigger hands a task (pure).

A trigger may declare a window and aggregations; when it fires, the agent
selects the window's events from the on-device store and computes the
aggregations, and the task gets both as `ctx.inputs` (docs/task-api.md)::

    "window":    {"seconds": 3600, "count": 1000, "types": ["page_view"]}
    "aggregate": [{"name": "dwell", "by": "page", "value": "dwell_ms",
                   "ops": ["count", "sum", "mean", "min", "max"]}]

A time window holds the events of the last `seconds` (up to the firing
time); a count window the last `count` events; both together, the last
`count` events within `seconds`. `types` filters by event type. Windows are
capped at MAX_WINDOW_EVENTS so a task input stays bounded.

An aggregation groups the window's events by `by` (`type`, `page`, `key` or
an attribute name; events without it are skipped) and computes `ops` over the
numeric attribute `value` (`count` needs no value). Only raw events stay on
the device: a task decides what of this leaves it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tether.agent.stream.events import Event
from tether.common import errors

MAX_WINDOW_EVENTS = 10_000
MAX_WINDOW_SECONDS = 30 * 86400
MAX_AGGREGATIONS = 16
MAX_GROUPS = 1000
AGG_OPS = ("count", "sum", "mean", "min", "max")


class InvalidWindow(errors.InvalidSpec):
    pass


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    seconds: float | None = None
    count: int | None = None
    types: frozenset[str] | None = None

    @classmethod
    def from_json(cls, doc: Any, *, field: str = "trigger.window") -> WindowSpec:
        if not isinstance(doc, Mapping):
            raise InvalidWindow("must be an object", field=field)
        unknown = set(doc) - {"seconds", "count", "types"}
        if unknown:
            raise InvalidWindow(f"unknown keys {sorted(map(str, unknown))}", field=field)
        seconds, count, types = doc.get("seconds"), doc.get("count"), doc.get("types")
        if seconds is None and count is None:
            raise InvalidWindow("needs seconds, count or both", field=field)
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_WINDOW_SECONDS
        ):
            raise InvalidWindow(f"must be in (0, {MAX_WINDOW_SECONDS}]", field=f"{field}.seconds")
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_WINDOW_EVENTS
        ):
            raise InvalidWindow(f"must be an integer in [1, {MAX_WINDOW_EVENTS}]", field=f"{field}.count")
        if types is not None and (
            not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types)
        ):
            raise InvalidWindow("must be a non-empty list of event types", field=f"{field}.types")
        return cls(
            seconds=None if seconds is None else float(seconds),
            count=count,
            types=None if types is None else frozenset(types),
        )

    @property
    def limit(self) -> int:
        return min(self.count or MAX_WINDOW_EVENTS, MAX_WINDOW_EVENTS)

    def since(self, now: float) -> float | None:
        return None if self.seconds is None else now - self.seconds

    def select(self, events: Sequence[Event], *, now: float) -> list[Event]:
        """The window's events out of `events` (oldest first), as the store's query returns them."""
        since = self.since(now)
        chosen = [
            e
            for e in events
            if e.ts <= now and (since is None or e.ts > since) and (self.types is None or e.type in self.types)
        ]
        return chosen[-self.limit :]


@dataclasses.dataclass(frozen=True)
class AggregateSpec:
    name: str
    by: str
    value: str | None
    ops: tuple[str, ...]

    @classmethod
    def from_json(cls, doc: Any, *, field: str) -> AggregateSpec:
        if not isinstance(doc, Mapping):
            raise InvalidWindow("must be an object", field=field)
        unknown = set(doc) - {"name", "by", "value", "ops"}
        if unknown:
            raise InvalidWindow(f"unknown keys {sorted(map(str, unknown))}", field=field)
        by = doc.get("by")
        if not isinstance(by, str) or not by:
            raise InvalidWindow("must name what to group by (type, page, key or an attribute)", field=f"{field}.by")
        value = doc.get("value")
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidWindow("must name a numeric attribute", field=f"{field}.value")
        ops = doc.get("ops", ["count"])
        if not isinstance(ops, list) or not ops or not all(op in AGG_OPS for op in ops):
            raise InvalidWindow(f"must be a non-empty list of {list(AGG_OPS)}", field=f"{field}.ops")
        if value is None and set(ops) - {"count"}:
            raise InvalidWindow("ops other than count need a value attribute", field=f"{field}.value")
        name = doc.get("name", f"by_{by}")
        if not isinstance(name, str) or not name:
            raise InvalidWindow("must be a non-empty string", field=f"{field}.name")
        return cls(name=name, by=by, value=value, ops=tuple(dict.fromkeys(ops)))


def parse_aggregates(doc: Any, *, field: str = "trigger.aggregate") -> tuple[AggregateSpec, ...]:
    items = [doc] if isinstance(doc, Mapping) else doc
    if not isinstance(items, list) or len(items) > MAX_AGGREGATIONS:
        raise InvalidWindow(f"must be an object or a list of at most {MAX_AGGREGATIONS}", field=field)
    specs = tuple(AggregateSpec.from_json(d, field=f"{field}[{i}]") for i, d in enumerate(items))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidWindow(f"names must be unique, got {names}", field=field)
    return specs


def _group(event: Event, by: str) -> str | None:
    value = event.get(by)
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def aggregate(events: Iterable[Event], spec: AggregateSpec) -> dict[str, dict[str, float]]:
    """Per-group ops: `count` counts the group's events; the others use its events whose `spec.value` is a
    finite number. At most MAX_GROUPS groups (the rest fold into "__other__")."""
    acc: dict[str, list[float]] = {}  # group -> [count, n_values, sum, min, max]
    for event in events:
        group = _group(event, spec.by)
        if group is None:
            continue
        if group not in acc and len(acc) >= MAX_GROUPS:
            group = "__other__"
        a = acc.setdefault(group, [0.0, 0.0, 0.0, math.inf, -math.inf])
        a[0] += 1
        if spec.value is not None:
            v = event.get(spec.value)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                a[1] += 1
                a[2] += v
                a[3] = min(a[3], v)
                a[4] = max(a[4], v)
    out: dict[str, dict[str, float]] = {}
    for group, (count, n, total, lo, hi) in sorted(acc.items()):
        row: dict[str, float] = {}
        for op in spec.ops:
            if op == "count":
                row["count"] = int(count)
            elif n:
                row[op] = {"sum": total, "mean": total / n, "min": lo, "max": hi}[op]
        out[group] = row
    return out


def aggregate_all(events: Sequence[Event], specs: Sequence[AggregateSpec]) -> dict[str, Any]:
    return {spec.name: aggregate(events, spec) for spec in specs}
