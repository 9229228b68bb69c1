"""Devices and credentials on Postgres (`contracts.DeviceRegistry`).

Each method is one short transaction on a pooled connection; enrolment locks
the device row so a revocation cannot slip between its check and the write.
Changes of credentials, facts and revocations are announced to every replica
by triggers on `devices` (migrations 0008, 0009), not from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tether.common import auth, errors
from tether.controller import devices
from tether.controller.storage import pg_rows

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool


class PostgresDevices:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def enroll_device(self, *, device_id: str, info: devices.DeviceInfo) -> auth.Credential:
        """Register a device, or rotate the credential of a known one (the old one stops working).

        The caller has checked the bootstrap token. A revoked device stays revoked.
        """
        auth.check_device_id(device_id)
        credential = auth.Credential(device_id=device_id, secret=auth.new_secret())
        async with self._pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute("SELECT revoked FROM devices WHERE device_id = %s FOR UPDATE", (device_id,))
            ).fetchone()
            if row is not None and row[0]:
                raise errors.PermissionDenied(f"device {device_id} is revoked and cannot re-enrol")
            await conn.execute(
                "INSERT INTO devices (device_id, credential_hash, attributes, backends, last_seen_at,"
                " credential_issued_at) VALUES (%s, %s, %s, %s, now(), now())"
                " ON CONFLICT (device_id) DO UPDATE SET credential_hash = EXCLUDED.credential_hash,"
                " attributes = EXCLUDED.attributes, backends = EXCLUDED.backends, last_seen_at = now(),"
                " credential_issued_at = now()",
                (device_id, credential.secret_hash, Jsonb(dict(info.attributes)), list(info.backends)),
            )
        return credential

    async def authenticate_device(self, credential: auth.Credential) -> devices.Device:
        """The device the credential belongs to; Unauthenticated otherwise (same message: no probing)."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    "SELECT device_id, credential_hash, attributes, backends, revoked, backend_choices FROM devices"
                    " WHERE device_id = %s",
                    (credential.device_id,),
                )
            ).fetchone()
        if row is None or not auth.secret_matches(credential.secret, row["credential_hash"]):
            raise errors.Unauthenticated("unknown device or wrong credential")
        if row["revoked"]:
            raise errors.Unauthenticated(f"device {credential.device_id} is revoked")
        return pg_rows.device(row)

    async def device(self, device_id: str) -> devices.Device | None:
        """A registered device as stored (revoked ones too), None when unknown."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    f"SELECT {pg_rows.DEVICE_COLUMNS} FROM devices WHERE device_id = %s",
                    (device_id,),
                )
            ).fetchone()
        return None if row is None else pg_rows.device(row)

    async def set_backend_choices(
        self,
        *,
        device_id: str,
        choices: Iterable[devices.BackendChoice],
        fingerprint: str,
        backends: Iterable[str],
    ) -> None:
        """Replace the device's backend selection results (ReportBackends) and its probed backends."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE devices SET backend_choices = %s, backend_fingerprint = %s, backends = %s,"
                " last_seen_at = now() WHERE device_id = %s",
                (Jsonb([c.to_json() for c in choices]), fingerprint[:128], list(backends), device_id),
            )

    async def touch_device(self, device_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE devices SET last_seen_at = now() WHERE device_id = %s", (device_id,))

    async def device_connected(self, device_id: str, replica_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE devices SET last_seen_at = now(), connected_replica = %s WHERE device_id = %s",
                (replica_id, device_id),
            )

    async def device_disconnected(self, device_id: str, replica_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE devices SET connected_replica = NULL, last_seen_at = now()"
                " WHERE device_id = %s AND connected_replica = %s",
                (device_id, replica_id),
            )

    async def revoke_device(self, device_id: str) -> bool:
        """Revoke a device for good: True when it was live, False when already revoked; NotFound when unknown."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE devices SET revoked = true, revoked_at = now() WHERE device_id = %s AND NOT revoked",
                (device_id,),
            )
            if cur.rowcount == 1:
                return True
            known = await (await conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,))).fetchone()
        if known is None:
            raise errors.NotFound(f"device {device_id} is not enrolled")
        return False

    async def not_live(self, device_ids: Iterable[str]) -> set[str]:
        """Those of `device_ids` that are revoked or no longer enrolled (one query for the whole set)."""
        wanted = list(dict.fromkeys(device_ids))
        if not wanted:
            return set()
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT device_id FROM devices WHERE device_id = ANY(%s) AND NOT revoked", (wanted,))
            ).fetchall()
        return set(wanted) - {r[0] for r in rows}

    async def rotate_credential(self, device_id: str) -> auth.Credential:
        """A new secret for a live device (credential renewal); the previous one stops working at once."""
        auth.check_device_id(device_id)
        credential = auth.Credential(device_id=device_id, secret=auth.new_secret())
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute(
                    "UPDATE devices SET credential_hash = %s, credential_issued_at = now(), last_seen_at = now()"
                    " WHERE device_id = %s AND NOT revoked RETURNING 1",
                    (credential.secret_hash, device_id),
                )
            ).fetchone()
        if row is None:
            raise errors.Unauthenticated(f"device {device_id} is revoked or not enrolled")
        return credential

    async def controller_secret(self, name: str, *, generate: Callable[[], bytes]) -> bytes:
        """A secret shared by every controller replica, created by the first one that asks (race-safe)."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO controller_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, generate()),
            )
            row = await (await conn.execute("SELECT value FROM controller_secrets WHERE name = %s", (name,))).fetchone()
        assert row is not None
        return bytes(row[0])

    async def list_devices(
        self, *, after: str = "", limit: int, include_revoked: bool = False
    ) -> list[devices.InventoryEntry]:
        """A page of the inventory in one query: devices by id, each with its deliveries."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    f"SELECT {pg_rows.DEVICE_COLUMNS}, extract(epoch FROM last_seen_at)::float8 AS last_seen,"
                    " state AS device_state,"
                    " COALESCE((SELECT jsonb_agg(jsonb_build_array(x.release, x.version, x.state)"
                    "   ORDER BY x.release) FROM deliveries x WHERE x.device_id = devices.device_id), '[]')"
                    "   AS delivered,"
                    # Shown only while that replica is alive: its LISTEN session is in pg_stat_activity.
                    " CASE WHEN connected_replica IS NOT NULL AND EXISTS (SELECT 1 FROM pg_stat_activity a"
                    "   WHERE a.application_name = left(%s || connected_replica, 63))"
                    "   THEN connected_replica ELSE '' END AS connected_replica"
                    " FROM devices WHERE device_id > %s AND (%s OR NOT revoked) ORDER BY device_id LIMIT %s",
                    (devices.LISTENER_APP_PREFIX, after, include_revoked, max(limit, 0)),
                )
            ).fetchall()
        return [
            devices.InventoryEntry(
                device=pg_rows.device(r),
                last_seen=r["last_seen"],
                releases=tuple(
                    devices.DeviceRelease(release=rel, version=int(v), state=st) for rel, v, st in r["delivered"]
                ),
                device_state={str(k): str(v) for k, v in (r["device_state"] or {}).items()},
                connected_replica=r["connected_replica"],
            )
            for r in rows
        ]

    async def active_devices(self) -> list[devices.Device]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(f"SELECT {pg_rows.DEVICE_COLUMNS} FROM devices WHERE NOT revoked ORDER BY device_id")
            ).fetchall()
        return [pg_rows.device(r) for r in rows]
