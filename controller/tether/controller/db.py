"""Postgres access: dated SQL migrations and connection pools (psycopg 3).

Migrations are the `migrations/*.sql` files of this package, applied in name
order, each once and in its own transaction, recorded in `schema_migrations`.
A transaction-level advisory lock serialises concurrent starts (several
controller replicas, a worker) so each file is applied exactly once.
"""

from __future__ import annotations

import importlib.resources
import logging

import psycopg

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x7E7E_0001  # arbitrary, constant: pg_advisory_xact_lock key


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
                conn.execute(sql)  # type: ignore[arg-type]  # trusted file shipped in the package
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied_now.append(name)
                log.info("applied migration %s", name)
    return applied_now
