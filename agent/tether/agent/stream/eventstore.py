"""The bounded on-device event store: SQLite in the agent's state directory.

Raw behaviour events never leave the device; they live here until retention
removes them: at most `max_events` rows and nothing older than `max_age_s`
(by the event's own time, against the injectable clock). Retention runs on
every append, so the file stays bounded however fast an app writes. WAL mode
with `synchronous=NORMAL`: an append is durable against a process crash, and
a power cut loses at most the last few (these are behaviour logs, not
ledgers). Blocking I/O; the stream processor calls it with small batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from tether.agent.stream.records import Event

DEFAULT_MAX_EVENTS = 100_000
DEFAULT_MAX_AGE_S = 7 * 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY,
    ts    REAL NOT NULL,
    type  TEXT NOT NULL,
    page  TEXT NOT NULL,
    key   TEXT NOT NULL,
    attrs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class EventStore:
    """Append-only, bounded event log. `seq` numbers increase forever (they are never reused)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_events < 1 or max_age_s <= 0:
            raise ValueError("max_events and max_age_s must be positive")
        self.path = pathlib.Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.clock = clock
        self.expired = 0  # rows removed by retention since this store was opened
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def append(self, events: Sequence[Event]) -> list[int]:
        """Store `events` (one transaction), apply retention, return their sequence numbers."""
        if not events:
            return []
        rows = [(e.ts, e.type, e.page, e.key, json.dumps(dict(e.attrs), separators=(",", ":"))) for e in events]
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                first = self._next_seq(db)  # kept in `meta`: numbers are never reused, even after deletions
                db.executemany(
                    "INSERT INTO events (seq, ts, type, page, key, attrs) VALUES (?, ?, ?, ?, ?, ?)",
                    [(first + i, *row) for i, row in enumerate(rows)],
                )
                last = first + len(rows) - 1
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('next_seq', ?)", (last + 1,))
                removed = db.execute("DELETE FROM events WHERE ts < ?", (self.clock() - self.max_age_s,)).rowcount
                removed += db.execute("DELETE FROM events WHERE seq <= ?", (last - self.max_events,)).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.expired += max(0, removed)
        return list(range(first, last + 1))

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE name = 'next_seq'").fetchone()
        return int(row[0]) if row else 1

    def expire(self) -> int:
        """Apply the age limit now (the agent calls this periodically when no events arrive)."""
        with self._lock:
            removed = self._conn().execute("DELETE FROM events WHERE ts < ?", (self.clock() - self.max_age_s,)).rowcount
            self.expired += max(0, removed)
            return removed

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 10_000,
        types: Iterable[str] | None = None,
    ) -> list[Event]:
        """The newest `limit` events with since < ts <= until (and of `types`), oldest first."""
        where: list[str] = ["1=1"]
        args: list[float | str] = []
        if since is not None:
            where.append("ts > ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        if types is not None:
            kinds = sorted(set(types))
            where.append(f"type IN ({','.join('?' * len(kinds))})")
            args.extend(kinds)
        sql = f"SELECT ts, type, page, key, attrs FROM events WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._conn().execute(sql, (*args, int(limit))).fetchall()
        return [_event(row) for row in reversed(rows)]

    def get(self, seqs: Iterable[int]) -> list[Event]:
        """Events by sequence number, in the order asked (ones already expired are left out)."""
        wanted = list(seqs)
        if not wanted:
            return []
        with self._lock:
            rows = self._conn().execute(
                f"SELECT seq, ts, type, page, key, attrs FROM events WHERE seq IN ({','.join('?' * len(wanted))})",
                wanted,
            )
            found = {row[0]: _event(row[1:]) for row in rows}
        return [found[s] for s in wanted if s in found]

    def count(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0])


def _event(row: tuple[float, str, str, str, str]) -> Event:
    ts, kind, page, key, attrs = row
    return Event(type=kind, page=page, ts=ts, attrs=json.loads(attrs), key=key)
