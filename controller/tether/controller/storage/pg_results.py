"""Device results on Postgres (`contracts.ResultLog`).

A result is stored with its delivery's success in one transaction, on the
release row read `FOR SHARE` (a concurrent apply cannot move the version
between the check and the insert). Aggregates are written by the Celery
worker (`tether.controller.tasks`), not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg.types.json import Jsonb

from tether.controller import devices, uploads
from tether.controller.storage import contracts, pg_rows

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool


class PostgresResults:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def insert_result(self, *, device: devices.Device, record: uploads.ResultRecord) -> contracts.InsertOutcome:
        """Store a result once per (device, idempotency key); a replay answers `duplicate=True`.

        A replay is recognised before any other check, so it stays a harmless
        no-op even after the release moved on. A new result must name a live
        release that targets the device, at its current or previous version.
        """
        async with self._pool.connection() as conn, conn.transaction():
            existing = await (
                await conn.execute(
                    "SELECT release, version FROM results WHERE device_id = %s AND idempotency_key = %s",
                    (device.device_id, record.idempotency_key),
                )
            ).fetchone()
            if existing is not None:
                return contracts.InsertOutcome(duplicate=True, release=existing[0], version=int(existing[1]))
            refused = uploads.refusal(await pg_rows.share_release(conn, record.release), device=device, record=record)
            if refused is not None:
                raise refused
            inserted = await (
                await conn.execute(
                    "INSERT INTO results (release, version, device_id, idempotency_key, sample_count, metrics,"
                    " counts, tensors, duration_s) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (device_id, idempotency_key) DO NOTHING RETURNING id",
                    (
                        record.release,
                        record.version,
                        device.device_id,
                        record.idempotency_key,
                        record.sample_count,
                        Jsonb(dict(record.metrics)),
                        Jsonb(dict(record.counts)),
                        Jsonb([dict(t) for t in record.tensors]),
                        record.duration_s,
                    ),
                )
            ).fetchone()
            if inserted is not None:
                # A stored result is the run's success, committed with it: the agent's own SUCCEEDED report
                # is best effort and is lost when the controller dies between the upload and the report.
                await conn.execute(
                    "INSERT INTO deliveries (release, device_id, version, state) VALUES (%s, %s, %s, 'succeeded')"
                    " ON CONFLICT (release, device_id) DO UPDATE SET version = EXCLUDED.version,"
                    " state = 'succeeded', message = '', updated_at = now()"
                    " WHERE deliveries.version < EXCLUDED.version OR (deliveries.version = EXCLUDED.version"
                    " AND deliveries.state IN ('notified', 'downloading', 'installed', 'running'))",
                    (record.release, device.device_id, record.version),
                )
            await conn.execute("UPDATE devices SET last_seen_at = now() WHERE device_id = %s", (device.device_id,))
        # A concurrent twin with the same key won the insert: this one is its duplicate.
        return contracts.InsertOutcome(duplicate=inserted is None, release=record.release, version=record.version)
