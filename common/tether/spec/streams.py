"""The stream parts of a trigger as pure specs: patterns, windows and aggregations (parsing only).

Shared by the agent (which matches and aggregates with them:
`tether.agent.stream.patterns`, `.windows`, `.processor` re-export these
names) and by the operator and the controller, which validate an MLTask's or
a release's trigger with the very parser the agent runs, without importing
the agent. Every error is an `errors.InvalidSpec` whose `field` names the
offending part (`trigger.pattern.steps[1].where.price`).

A pattern (`tether.agent.stream.patterns` documents its semantics)::

    {"steps": [{"type": "page_view", "page": "item"},
               {"type": "add_to_cart", "where": {"price": {"gte": 10}}}],
     "within": 30}

A window and aggregations (`tether.agent.stream.windows`)::

    "window":    {"seconds": 3600, "count": 1000, "types": ["page_view"]}
    "aggregate": [{"name": "dwell", "by": "page", "value": "dwell_ms", "ops": ["count", "mean"]}]

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tether.common import errors


class EventLike(Protocol):
    """What the specs test: a behaviour event (`tether.agent.stream.records.Event`)."""

    @property
    def type(self) -> str: ...

    @property
    def page(self) -> str: ...

    @property
    def ts(self) -> float: ...

    def get(self, name: str) -> Any: ...


MAX_STEPS = 8
MAX_CONDITIONS = 16
MAX_IN_VALUES = 64
MAX_WITHIN_S = 7 * 86400
OPS = frozenset({"eq", "ne", "in", "notIn", "gt", "gte", "lt", "lte", "exists", "prefix"})
_NUMERIC_OPS = frozenset({"gt", "gte", "lt", "lte"})


class InvalidPattern(errors.InvalidSpec):
    """A pattern spec is malformed (`field` names where)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    """Strings equal strings, numbers numbers (1 == 1.0), booleans booleans (True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    attr: str
    op: str
    value: Any  # a scalar, a frozenset for in/notIn, a bool for exists

    def test(self, event: EventLike) -> bool:
        actual = event.get(self.attr)
        op = self.op
        if op == "exists":
            return bool((actual is not None) == self.value)
        if actual is None:
            return op in ("ne", "notIn")
        if op == "eq":
            return _equal(actual, self.value)
        if op == "ne":
            return not _equal(actual, self.value)
        if op == "in":
            return any(_equal(actual, v) for v in self.value)
        if op == "notIn":
            return not any(_equal(actual, v) for v in self.value)
        if op == "prefix":
            return isinstance(actual, str) and actual.startswith(str(self.value))
        if not _is_number(actual):
            return False
        if op == "gt":
            return bool(actual > self.value)
        if op == "gte":
            return bool(actual >= self.value)
        if op == "lt":
            return bool(actual < self.value)
        return bool(actual <= self.value)  # lte


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    type: str
    page: str | None = None
    where: tuple[Condition, ...] = ()

    def test(self, event: EventLike) -> bool:
        if event.type != self.type or (self.page is not None and event.page != self.page):
            return False
        return all(c.test(event) for c in self.where)


@dataclasses.dataclass(frozen=True, slots=True)
class Pattern:
    steps: tuple[Step, ...]
    within_s: float

    @classmethod
    def from_json(cls, doc: Any, *, field: str = "pattern") -> Pattern:
        if not isinstance(doc, Mapping):
            raise InvalidPattern("must be an object", field=field)
        unknown = set(doc) - {"steps", "within"}
        if unknown:
            raise InvalidPattern(f"unknown keys {sorted(map(str, unknown))}", field=field)
        steps = doc.get("steps")
        if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
            raise InvalidPattern(f"must be a list of 1 to {MAX_STEPS} steps", field=f"{field}.steps")
        within = doc.get("within", MAX_WITHIN_S)
        if not _is_number(within) or not 0 <= within <= MAX_WITHIN_S:
            raise InvalidPattern(
                f"must be seconds in [0, {MAX_WITHIN_S}], got {errors.excerpt(within)}", field=f"{field}.within"
            )
        return cls(
            steps=tuple(_step(s, field=f"{field}.steps[{i}]") for i, s in enumerate(steps)), within_s=float(within)
        )


def _step(doc: Any, *, field: str) -> Step:
    if not isinstance(doc, Mapping):
        raise InvalidPattern("must be an object", field=field)
    unknown = set(doc) - {"type", "page", "where"}
    if unknown:
        raise InvalidPattern(f"unknown keys {sorted(map(str, unknown))}", field=field)
    kind = doc.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidPattern("must be a non-empty string", field=f"{field}.type")
    page = doc.get("page")
    if page is not None and not isinstance(page, str):
        raise InvalidPattern("must be a string", field=f"{field}.page")
    where = doc.get("where") or {}
    if not isinstance(where, Mapping) or len(where) > MAX_CONDITIONS:
        raise InvalidPattern(f"must be an object of at most {MAX_CONDITIONS} conditions", field=f"{field}.where")
    conditions = []
    for attr, spec in where.items():
        f = f"{field}.where.{attr}"
        if not isinstance(attr, str) or not attr:
            raise InvalidPattern("attribute names must be non-empty strings", field=f)
        items = spec.items() if isinstance(spec, Mapping) else [("eq", spec)]
        for op, value in items:
            conditions.append(_condition(attr, op, value, field=f))
    conditions.sort(key=lambda c: (c.attr, c.op, repr(c.value)))
    return Step(type=kind, page=page, where=tuple(conditions))


def _scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or (_is_number(value) and math.isfinite(value))


def _condition(attr: str, op: Any, value: Any, *, field: str) -> Condition:
    if op not in OPS:
        raise InvalidPattern(f"operator {errors.excerpt(op)} is not one of {sorted(OPS)}", field=field)
    if op in ("in", "notIn"):
        if not isinstance(value, list) or len(value) > MAX_IN_VALUES or not all(_scalar(v) for v in value):
            raise InvalidPattern(f"{op} takes a list of at most {MAX_IN_VALUES} scalars", field=field)
        return Condition(attr, op, frozenset(value))
    if op == "exists":
        if not isinstance(value, bool):
            raise InvalidPattern("exists takes true or false", field=field)
        return Condition(attr, op, value)
    if op in _NUMERIC_OPS and not (_is_number(value) and math.isfinite(value)):
        raise InvalidPattern(f"{op} takes a finite number", field=field)
    if op == "prefix" and not isinstance(value, str):
        raise InvalidPattern("prefix takes a string", field=field)
    if not _scalar(value):
        raise InvalidPattern(f"{op} takes a string, number or boolean", field=field)
    return Condition(attr, op, value)


# ---------------------------------------------------------------- windows and aggregations

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

    def select(self, events: Sequence[EventLike], *, now: float) -> list[EventLike]:
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


# ---------------------------------------------------------------- what a trigger asks of the stream

MAX_COOLDOWN_S = 86400


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a trigger asks of the stream: an optional pattern, window and aggregations."""

    pattern: Pattern | None = None
    window: WindowSpec | None = None
    aggregates: tuple[AggregateSpec, ...] = ()
    cooldown_s: float = 0.0

    @classmethod
    def from_trigger(cls, doc: Mapping[str, Any], *, require_pattern: bool) -> StreamSpec:
        pattern = None
        if require_pattern or "pattern" in doc:
            pattern = Pattern.from_json(doc.get("pattern"), field="trigger.pattern")
        window = WindowSpec.from_json(doc["window"]) if "window" in doc else None
        aggregates = parse_aggregates(doc["aggregate"]) if "aggregate" in doc else ()
        if aggregates and window is None:
            raise InvalidWindow("aggregations need a window", field="trigger.aggregate")
        cooldown = doc.get("cooldownSeconds", 0)
        if isinstance(cooldown, bool) or not isinstance(cooldown, int | float) or not 0 <= cooldown <= MAX_COOLDOWN_S:
            raise errors.InvalidSpec(f"must be seconds in [0, {MAX_COOLDOWN_S}]", field="trigger.cooldownSeconds")
        return cls(pattern=pattern, window=window, aggregates=aggregates, cooldown_s=float(cooldown))
