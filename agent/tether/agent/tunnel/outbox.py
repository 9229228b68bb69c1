"""The durable outbox of emitted records: SQLite in the agent's state directory.

An emit is acknowledged to the task only after its row is committed (WAL,
`synchronous=NORMAL`: durable against a crash of the agent or the task; a
power cut may lose the last few). A row leaves only when the controller acked
its seq, i.e. the broker has it. `seq` is the record's idempotency key with
the device id: the table's AUTOINCREMENT never reuses a number, and a new
outbox starts at the clock in microseconds, so a device whose state directory
was wiped still numbers above everything it sent before (the cloud drops a
seq it has seen as a duplicate). The outbox is bounded in bytes
(`max_bytes`): an append past it is refused with `LimitExceeded(outbox_bytes)`.

Blocking I/O, short transactions; one connection shared under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable

from tether.spec import emits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    topic         TEXT NOT NULL,
    payload       BLOB NOT NULL,
    emitted_at_ms INTEGER NOT NULL,
    release       TEXT NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class Record:
    seq: int
    topic: str
    payload: bytes
    emitted_at_ms: int
    release: str


class Outbox:
    """Append, read the oldest, delete through an acked seq. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = emits.TunnelLimits().max_outbox_bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = pathlib.Path(path)
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._count = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            with db:
                db.execute("BEGIN IMMEDIATE")
                if db.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'records'").fetchone() is None:
                    start = int(self.clock() * 1_000_000)  # above whatever a wiped outbox of this device sent
                    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (start,))
            count, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM records").fetchone()
            self._count, self._bytes = int(count), int(size)
            self._db = db
        return self._db

    def open(self) -> Outbox:
        with self._lock:
            self._conn()
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._count

    def append(self, *, topic: str, payload: bytes, release: str, emitted_at_ms: int | None = None) -> int:
        """Commit one record and return its seq; LimitExceeded(outbox_bytes) when it would not fit."""
        with self._lock:
            db = self._conn()
            if self._bytes + len(payload) > self.max_bytes:
                raise emits.LimitExceeded(
                    emits.LIMIT_OUTBOX,
                    f"{self._count} records ({self._bytes} bytes) wait for the controller; "
                    f"at most {self.max_bytes} bytes are kept",
                )
            at = int(self.clock() * 1000) if emitted_at_ms is None else emitted_at_ms
            cur = db.execute(
                "INSERT INTO records (topic, payload, emitted_at_ms, release) VALUES (?, ?, ?, ?)",
                (topic, payload, at, release),
            )
            self._bytes += len(payload)
            self._count += 1
            seq = cur.lastrowid
            assert seq is not None
            return int(seq)

    def oldest(self, *, max_records: int, max_bytes: int) -> list[Record]:
        """The oldest records, in seq order, at most `max_records` and `max_bytes` (at least one)."""
        out: list[Record] = []
        size = 0
        with self._lock:
            rows = self._conn().execute(
                "SELECT seq, topic, payload, emitted_at_ms, release FROM records ORDER BY seq LIMIT ?",
                (max_records,),
            )
            for seq, topic, payload, at, release in rows:
                if out and size + len(payload) > max_bytes:
                    break
                out.append(Record(int(seq), topic, bytes(payload), int(at), release))
                size += len(payload)
        return out

    def ack(self, through: int) -> int:
        """Delete every record with seq <= `through`; how many went."""
        with self._lock:
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                gone = db.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records WHERE seq <= ?", (through,)
                ).fetchone()
                db.execute("DELETE FROM records WHERE seq <= ?", (through,))
            self._count -= int(gone[0])
            self._bytes -= int(gone[1])
            return int(gone[0])

    def drop(self, seq: int) -> None:
        """Remove one record the controller refused for good (it would block the rest forever)."""
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT length(payload) FROM records WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM records WHERE seq = ?", (seq,))
                self._count -= 1
                self._bytes -= int(row[0])
