"""Postgres access: dated SQL migrations and connection pools (psycopg 3).

Migrations are the `migrations/*.sql` files of this package, applied in name
order, each once and in its own transaction, recorded in `schema_migrations`.
A transaction-level advisory lock serialises concurrent starts (several
controller replicas, a worker) so each file is applied exactly once.

`open_pool` gives the async services one bounded pool per process: every
request borrows a connection for one short transaction and never holds it
while waiting on the network (a Subscribe stream holds none).
"""

from __future__ import annotations

import importlib.resources
import logging
from typing import TYPE_CHECKING

import psycopg

from tether.common import tracing

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x7E7E_0001  # arbitrary, constant: pg_advisory_xact_lock key
MAX_WAITING = 20_000  # requests queued for a pooled connection (a waiter is a future: ~1 KB)


def migration_files() -> list[tuple[str, str]]:
    root = importlib.resources.files("tether.controller") / "migrations"
    files = sorted((p.name, p.read_text(encoding="utf-8")) for p in root.iterdir() if p.name.endswith(".sql"))
    return files


def migrate(conninfo: str) -> list[str]:
    """Apply pending migrations; return the names applied now."""
    applied_now: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for name, sql in migration_files():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                done = conn.execute("SELECT 1 FROM schema_migrations WHERE name = %s", (name,)).fetchone()
                if done:
                    continue
                conn.execute(sql)  # trusted file shipped in the package
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied_now.append(name)
                log.info("applied migration %s", name)
    return applied_now


async def _instrument_connection(conn: psycopg.AsyncConnection) -> None:
    tracing.instrument_connection(conn)


async def open_pool(
    conninfo: str,
    *,
    min_size: int = 1,
    max_size: int = 20,
    timeout: float = 30.0,
    name: str = "tether",
) -> AsyncConnectionPool:
    """An opened async pool; fails within `timeout` seconds when the server is unreachable."""
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=timeout,
        name=name,
        # Autocommit: a lone read commits by itself; every write opens an explicit `conn.transaction()`.
        kwargs={"autocommit": True},
        # A request waits at most `timeout` for a connection, then fails clearly instead of piling up.
        # The queue is deep enough for a fleet pulling at once: a rejected device retries the whole
        # install after a backoff, so rejecting early costs more than waiting (tether bench fleet).
        max_waiting=max(max_size * 50, MAX_WAITING),
        # OTel's psycopg instrumentation, when on: a span per statement of each connection the pool opens.
        configure=_instrument_connection if tracing.instrumented("psycopg") else None,
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except BaseException:
        await pool.close()
        raise
    return pool
