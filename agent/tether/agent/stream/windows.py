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

The specs (`WindowSpec`, `AggregateSpec`, `parse_aggregates`) live in
`tether.spec.streams`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from tether.agent.stream.records import Event
from tether.spec.streams import (  # the pure spec, shared with the operator and the controller
    MAX_GROUPS,
    AggregateSpec,
)


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
