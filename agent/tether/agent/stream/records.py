"""Behaviour events: the model and its validation (pure).

An event is what an app reports about its user's behaviour: a `type`
("page_view", "add_to_cart"), the `page` (or scene) it happened on, a
timestamp `ts` (POSIX seconds, float), an optional `key` (the entity to
aggregate by: a session, an item) and a flat dict of scalar `attrs`.

Events come from apps over a local socket, so they are untrusted input:
`parse_event` checks every field and bound and raises `InvalidEvent` naming
the field. The stream processor counts and drops such events; it never
crashes on one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from tether.common import errors

NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
ATTR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_ATTRS = 32
MAX_STRING = 256
MAX_PAGE = 256
MAX_KEY = 128
MAX_EVENT_BYTES = 8 * 1024  # of one encoded event on the wire
# Timestamps must be plausible POSIX seconds (2001..2100): catches milliseconds sent as seconds.
MIN_TS = 978_307_200.0
MAX_TS = 4_102_444_800.0

Scalar = str | int | float | bool


class InvalidEvent(errors.InvalidArgument):
    """An event is malformed; `field` names the offending part."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    type: str
    page: str
    ts: float
    attrs: Mapping[str, Scalar] = dataclasses.field(default_factory=dict)
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": self.type, "page": self.page, "ts": self.ts, "attrs": dict(self.attrs)}
        if self.key:
            doc["key"] = self.key
        return doc

    def get(self, name: str) -> Any:
        """An attribute, or one of the fields `type`, `page`, `key` by that name (None when absent)."""
        if name in self.attrs:
            return self.attrs[name]
        if name in ("type", "page", "key"):
            return getattr(self, name)
        return None


def _text(doc: Mapping[str, Any], field: str, *, limit: int, required: bool, pattern: re.Pattern[str] | None) -> str:
    value = doc.get(field, "" if not required else None)
    if value is None:
        raise InvalidEvent("is required", field=field)
    if not isinstance(value, str):
        raise InvalidEvent(f"must be a string, got {type(value).__name__}", field=field)
    if len(value) > limit:
        raise InvalidEvent(f"longer than {limit} characters", field=field)
    if pattern is not None and value and not pattern.match(value):
        raise InvalidEvent(f"{value!r} must match {pattern.pattern}", field=field)
    if required and not value:
        raise InvalidEvent("must not be empty", field=field)
    return value


def parse_event(doc: Any, *, now: float | None = None) -> Event:
    """Validate one event document. `ts` defaults to `now` when the app leaves it out."""
    if not isinstance(doc, Mapping):
        raise InvalidEvent(f"an event must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"type", "page", "ts", "attrs", "key"}
    if unknown:
        raise InvalidEvent(f"unknown fields {sorted(map(str, unknown))}")
    kind = _text(doc, "type", limit=64, required=True, pattern=NAME_RE)
    page = _text(doc, "page", limit=MAX_PAGE, required=False, pattern=None)
    key = _text(doc, "key", limit=MAX_KEY, required=False, pattern=None)
    ts = doc.get("ts", now)
    if ts is None:
        raise InvalidEvent("is required", field="ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise InvalidEvent(f"must be a finite number of seconds, got {ts!r}", field="ts")
    if not MIN_TS <= ts <= MAX_TS:
        raise InvalidEvent(f"{ts!r} is not a plausible POSIX time in seconds", field="ts")
    raw_attrs = doc.get("attrs") or {}
    if not isinstance(raw_attrs, Mapping):
        raise InvalidEvent(f"must be an object, got {type(raw_attrs).__name__}", field="attrs")
    if len(raw_attrs) > MAX_ATTRS:
        raise InvalidEvent(f"{len(raw_attrs)} attributes; the limit is {MAX_ATTRS}", field="attrs")
    attrs: dict[str, Scalar] = {}
    for name, value in raw_attrs.items():
        if not isinstance(name, str) or not ATTR_NAME_RE.match(name):
            raise InvalidEvent(f"attribute name {name!r} must match {ATTR_NAME_RE.pattern}", field="attrs")
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise InvalidEvent(f"longer than {MAX_STRING} characters", field=f"attrs.{name}")
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise InvalidEvent("integer out of the int64 range", field=f"attrs.{name}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidEvent("must be finite", field=f"attrs.{name}")
        else:
            raise InvalidEvent(
                f"must be a string, number or boolean, got {type(value).__name__}", field=f"attrs.{name}"
            )
        attrs[name] = value
    return Event(type=kind, page=page, ts=float(ts), attrs=attrs, key=key)
