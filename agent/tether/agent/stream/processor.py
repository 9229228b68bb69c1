"""The on-device stream processor: validate, store, match, and build task inputs.

`StreamProcessor.ingest` takes raw event documents (from the local socket or
in-process), validates each one (a malformed event is counted and dropped with
its reason; the rest of the batch goes on), appends the valid ones to the
bounded `EventStore`, and feeds them to the `TrieMatcher` holding every
registered pattern trigger. A match calls `on_match(owner, fire)` right away;
the daemon turns that into a task run whose `ctx.inputs` come from
`inputs_for` (the match, the trigger's window and aggregations).

Event time for matching never goes backwards: an event stamped earlier than
the newest one seen is matched at the newest time (it is stored with its own
time). A trigger's `cooldownSeconds` suppresses matches that complete sooner
than that after its previous one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from tether.agent.stream import patterns, records, windows
from tether.agent.stream.eventstore import EventStore
from tether.spec.streams import StreamSpec  # pure, shared with operator/controller

log = logging.getLogger(__name__)

MAX_BATCH = 1000
MAX_ERRORS_REPORTED = 10


@dataclasses.dataclass(frozen=True)
class Fire:
    """A pattern trigger fired: the match and the matched events (oldest first)."""

    match: patterns.Match
    events: tuple[records.Event, ...]


@dataclasses.dataclass(frozen=True)
class IngestResult:
    accepted: int
    rejected: int
    matched: int
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "matched": self.matched,
            "errors": list(self.errors),
        }


class StreamProcessor:
    def __init__(
        self,
        store: EventStore,
        *,
        clock: Callable[[], float] = time.time,
        on_match: Callable[[str, Fire], None] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_match = on_match
        self.matcher = patterns.TrieMatcher()
        self._specs: dict[str, StreamSpec] = {}
        self._last_fire: dict[str, float] = {}
        self._last_ts = patterns.NEG_INF
        self.accepted = 0
        self.rejected = 0
        self.matched = 0

    # ------------------------------------------------------------ registration
    def register(self, owner: str, spec: StreamSpec) -> None:
        """Match `spec.pattern` for `owner` (a release); replaces what `owner` had."""
        self.unregister(owner)
        if spec.pattern is not None:
            self.matcher.add(owner, spec.pattern)
        self._specs[owner] = spec

    def unregister(self, owner: str) -> None:
        self.matcher.remove(owner)
        self._specs.pop(owner, None)
        self._last_fire.pop(owner, None)

    def registered(self) -> list[str]:
        return sorted(self._specs)

    # ------------------------------------------------------------ ingestion
    def ingest(self, docs: Iterable[Any]) -> IngestResult:
        """Validate, store and match a batch; never raises for a bad event (it is counted instead)."""
        now = self.clock()
        valid: list[records.Event] = []
        problems: list[str] = []
        rejected = 0
        for i, doc in enumerate(docs):
            if i >= MAX_BATCH:
                rejected += 1
                if len(problems) < MAX_ERRORS_REPORTED:
                    problems.append(f"[{i}]: batch larger than {MAX_BATCH} events")
                continue
            try:
                valid.append(records.parse_event(doc, now=now))
            except records.InvalidEvent as e:
                rejected += 1
                if len(problems) < MAX_ERRORS_REPORTED:
                    problems.append(f"[{i}] {e}")
        self.rejected += rejected
        if not valid:
            return IngestResult(0, rejected, 0, tuple(problems))
        seqs = self.store.append(valid)
        self.accepted += len(valid)
        matched = 0
        for event, seq in zip(valid, seqs, strict=True):
            if event.ts < self._last_ts:
                event = dataclasses.replace(event, ts=self._last_ts)
            self._last_ts = event.ts
            for match in self.matcher.feed(event, seq):
                if self._fire(match):
                    matched += 1
        self.matched += matched
        return IngestResult(len(valid), rejected, matched, tuple(problems))

    def _fire(self, match: patterns.Match) -> bool:
        spec = self._specs.get(match.pattern)
        if spec is None:
            return False
        last = self._last_fire.get(match.pattern)
        if last is not None and match.end - last < spec.cooldown_s:
            return False
        self._last_fire[match.pattern] = match.end
        if self.on_match is not None:
            fire = Fire(match=match, events=tuple(self.store.get(match.chain)))
            try:
                self.on_match(match.pattern, fire)
            except Exception:  # a broken consumer must not stop ingestion
                log.exception("pattern trigger %s: on_match failed", match.pattern)
        return True

    # ------------------------------------------------------------ task inputs
    def inputs_for(self, spec: StreamSpec | None, *, now: float, fire: Fire | None = None) -> dict[str, Any]:
        """`ctx.inputs` stream parts: "match" (pattern triggers), "events" (window), "aggregates"."""
        out: dict[str, Any] = {}
        if fire is not None:
            out["match"] = {
                "start": fire.match.start,
                "end": fire.match.end,
                "events": [e.to_json() for e in fire.events],
            }
        if spec is not None and spec.window is not None:
            w = spec.window
            selected = self.store.query(since=w.since(now), until=now, limit=w.limit, types=w.types)
            out["events"] = [e.to_json() for e in selected]
            if spec.aggregates:
                out["aggregates"] = windows.aggregate_all(selected, spec.aggregates)
        return out

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "matched": self.matched,
            "patterns": len(self.matcher),
            "trie_nodes": self.matcher.node_count,
            "expired": self.store.expired,
        }
