"""Releases, deliveries and status counts on Postgres (`contracts.ReleaseLedger`).

Checks that decide whether a write is allowed (the manifest exists, the
release targets this device, the version is current) run inside the write's
transaction, on rows locked `FOR SHARE` / `FOR UPDATE`, so a concurrent apply
cannot slip between check and write; a refused request raises a `TetherError`
and the transaction rolls back, leaving stored state unchanged.

Every writer of `deliveries` locks rows in key order (release, device id), so
a fleet-wide Notify and a burst of reports on another replica never deadlock;
should the server still roll a batch back (class 40), it is tried again.
A trigger on `releases` announces every committed change to the replicas
(migration 0006, `tether.controller.replicas`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tether.common import errors
from tether.controller import deliveries, devices, releases, serving
from tether.controller.storage import contracts, pg_rollouts, pg_rows
from tether.spec import selectors

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

# A transaction the server rolled back because of other transactions (class 40): worth running again.
_ROLLED_BACK = (
    psycopg.errors.TransactionRollback,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)


class PostgresReleases:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def apply_release(self, spec: releases.ReleaseSpec) -> contracts.ApplyOutcome:
        """Create or update a release; bump its version only when content or policy changed.

        An unknown manifest digest raises FailedPrecondition and stores nothing.
        Re-applying a deleted release revives it under a new version.
        """
        async with self._pool.connection() as conn, conn.transaction():
            known = await (
                await conn.execute("SELECT 1 FROM manifests WHERE digest = %s FOR SHARE", (spec.manifest_digest,))
            ).fetchone()
            if known is None:
                raise errors.FailedPrecondition(
                    f"manifest {spec.manifest_digest} is not stored on the controller; upload the bundle first"
                )
            previous = await pg_rows.lock_release(conn, spec.release)
            spec = releases.effective_spec(previous, spec)
            if previous is None:
                inserted = await (
                    await conn.execute(
                        "INSERT INTO releases (release, version, generation, manifest_digest, target, trigger,"
                        " aggregation, resources, paused, federated, base_manifest)"
                        " VALUES (%s, 1, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (release) DO NOTHING RETURNING version",
                        (
                            spec.release,
                            spec.generation,
                            spec.manifest_digest,
                            Jsonb(dict(spec.target)),
                            Jsonb(dict(spec.trigger)),
                            Jsonb(dict(spec.aggregation)),
                            Jsonb(dict(spec.resources)),
                            spec.paused,
                            Jsonb(dict(spec.federated)),
                            spec.base_manifest,
                        ),
                    )
                ).fetchone()
                if inserted is not None:
                    created = await pg_rollouts.write(conn, rel=_new_release(spec, version=1), previous=None)
                    return contracts.ApplyOutcome(release=created, previous=None, changed=True)
                previous = await pg_rows.lock_release(conn, spec.release)  # lost a race with a concurrent create
                assert previous is not None
                spec = releases.effective_spec(previous, spec)
            changed = previous.deleted or releases.content_changed(previous.spec, spec)
            version = previous.version + 1 if changed else previous.version
            if not changed and previous.spec == spec:
                # a no-op writes nothing
                return contracts.ApplyOutcome(release=previous, previous=previous, changed=False)
            await conn.execute(
                "UPDATE releases SET version = %s, generation = %s, manifest_digest = %s, target = %s,"
                " trigger = %s, aggregation = %s, resources = %s, paused = %s, federated = %s, base_manifest = %s,"
                " deleted = false,"
                " updated_at = now()"
                " WHERE release = %s",
                (
                    version,
                    spec.generation,
                    spec.manifest_digest,
                    Jsonb(dict(spec.target)),
                    Jsonb(dict(spec.trigger)),
                    Jsonb(dict(spec.aggregation)),
                    Jsonb(dict(spec.resources)),
                    spec.paused,
                    Jsonb(dict(spec.federated)),
                    spec.base_manifest,
                    spec.release,
                ),
            )
            updated = await pg_rollouts.write(conn, rel=_new_release(spec, version=version), previous=previous)
        return contracts.ApplyOutcome(release=updated, previous=previous, changed=changed)

    async def delete_release(self, release: str) -> releases.Release | None:
        """Mark a release deleted (results and aggregates stay); return it as it was, None when absent."""
        async with self._pool.connection() as conn, conn.transaction():
            previous = await pg_rows.lock_release(conn, release)
            if previous is None or previous.deleted:
                return None
            await conn.execute("UPDATE releases SET deleted = true, updated_at = now() WHERE release = %s", (release,))
        return previous

    async def get_release(self, release: str) -> releases.Release | None:
        """A live (not deleted) release."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    f"SELECT {pg_rows.RELEASE_COLUMNS} FROM releases WHERE release = %s AND NOT deleted", (release,)
                )
            ).fetchone()
        return None if row is None else pg_rows.release(row)

    async def list_releases(self) -> list[releases.Release]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(f"SELECT {pg_rows.RELEASE_COLUMNS} FROM releases WHERE NOT deleted ORDER BY release")
            ).fetchall()
        return [pg_rows.release(r) for r in rows]

    async def release_views(self, device_id: str, *, release: str | None = None) -> list[serving.ReleaseView]:
        """Every live release (or just `release`) with this device's delivery of it, ordered by name."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            if release is None:
                await cur.execute(pg_rows.VIEW_SELECT + " WHERE NOT r.deleted ORDER BY r.release", (device_id,))
            else:
                await cur.execute(pg_rows.VIEW_SELECT + " WHERE r.release = %s AND NOT r.deleted", (device_id, release))
            rows = await cur.fetchall()
        return [pg_rows.view(row) for row in rows]

    async def desired_tasks(self, device: devices.Device) -> list[serving.DesiredTask]:
        """Every live release offered to this device (its full desired state)."""
        return serving.desired(await self.release_views(device.device_id), device.facts)

    async def mark_notified(
        self, *, release: str, version: int, device_ids: Sequence[str], downgrade: bool = False
    ) -> None:
        """Record that these devices were told about `version` (never moves a delivery backwards).

        `downgrade`: they were sent back to an older version on purpose (a staged
        rollout's stable version), so their deliveries move back to it.
        """
        if not device_ids:
            return
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO deliveries (release, device_id, version, state)"
                " SELECT %s, d, %s, 'notified' FROM unnest(%s::text[]) AS d"
                " ON CONFLICT (release, device_id) DO UPDATE SET version = EXCLUDED.version,"
                " state = 'notified', message = '', updated_at = now(), installed_at = NULL"
                " WHERE deliveries.version < EXCLUDED.version OR (%s AND deliveries.version > EXCLUDED.version)",
                # Rows in key order, as every writer of deliveries locks them (no deadlock with a report batch).
                (release, version, sorted(device_ids), downgrade),
            )

    async def mark_synced(self, *, device_id: str, tasks: Sequence[serving.DesiredTask]) -> None:
        """Record the desired state sent in a Sync as notified (same rule as `mark_notified`)."""
        if not tasks:
            return
        async with self._pool.connection() as conn, conn.transaction():
            # Rollback tasks (a staged rollout's stable version) move a delivery back; the others never do.
            for downgrade in (False, True):
                batch = sorted((t for t in tasks if t.rollback == downgrade), key=lambda t: t.release)  # lock order
                if not batch:
                    continue
                await conn.execute(
                    "INSERT INTO deliveries (release, device_id, version, state)"
                    " SELECT t.release, %s, t.version, 'notified'"
                    " FROM unnest(%s::text[], %s::bigint[]) AS t(release, version)"
                    " JOIN releases r ON r.release = t.release"
                    " ON CONFLICT (release, device_id) DO UPDATE SET version = EXCLUDED.version,"
                    " state = 'notified', message = '', updated_at = now(), installed_at = NULL"
                    " WHERE deliveries.version < EXCLUDED.version"
                    " OR (%s AND deliveries.version > EXCLUDED.version)",
                    (device_id, [t.release for t in batch], [t.version for t in batch], downgrade),
                )

    async def confirm_installed(self, *, device_id: str, installs: Sequence[tuple[str, int]]) -> int:
        if not installs:
            return 0
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE deliveries d SET state = 'installed', message = '', updated_at = now(),"
                " installed_at = coalesce(d.installed_at, now())"
                " FROM unnest(%s::text[], %s::bigint[]) AS t(release, version)"
                " WHERE d.release = t.release AND d.device_id = %s AND d.version = t.version"
                " AND d.state = ANY(%s)",
                (
                    [r for r, _ in installs],
                    [v for _, v in installs],
                    device_id,
                    list(deliveries.UNCONFIRMED_STATES),
                ),
            )
            return cur.rowcount

    async def write_reports(self, reports: Sequence[deliveries.DeliveryReport]) -> list[BaseException | None]:
        """One transaction for the batch (`reporting` groups them); each report alone when the database refuses
        it (to find the bad one).

        A deadlock or serialization failure (the batch's rows locked against another writer of
        deliveries: `mark_notified` on this or another replica) rolled everything back: the batch
        is tried once more, then report by report.
        """
        if len(reports) > 1:
            for attempt in range(2):
                try:
                    async with self._pool.connection() as conn, conn.transaction():
                        return await _write_deliveries(conn, reports)
                except _ROLLED_BACK:
                    if attempt:
                        break
                except psycopg.DataError:
                    break
        outcomes: list[BaseException | None] = []
        for report in reports:
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    outcomes.extend(await _write_deliveries(conn, [report]))
            except psycopg.DataError as e:
                outcomes.append(errors.InvalidArgument(f"report on {report.release!r} could not be stored: {e}"))
            except Exception as e:  # its own failure only: the reports before it are committed
                outcomes.append(e)
        return outcomes

    async def release_counts(
        self, names: Sequence[str] | None = None, *, report_deadline_s: int | None = None
    ) -> list[deliveries.ReleaseCounts]:
        """Status counts of the named live releases (all when None); NotFound for an unknown name."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            if names is None:
                await cur.execute(f"SELECT {pg_rows.RELEASE_COLUMNS} FROM releases WHERE NOT deleted ORDER BY release")
            else:
                await cur.execute(
                    f"SELECT {pg_rows.RELEASE_COLUMNS} FROM releases WHERE NOT deleted AND release = ANY(%s)"
                    " ORDER BY release",
                    (list(names),),
                )
            rels = [pg_rows.release(r) for r in await cur.fetchall()]
            if names is not None:
                found = {r.name for r in rels}
                for name in names:
                    if name not in found:
                        raise errors.NotFound(f"release {name!r} does not exist")
            if not rels:
                return []
            fleet = [
                pg_rows.device(r)
                for r in await (
                    await cur.execute(f"SELECT {pg_rows.DEVICE_COLUMNS} FROM devices WHERE NOT revoked")
                ).fetchall()
            ]
            keys = ([r.name for r in rels], [r.version for r in rels])
            deadlines = {r.name: deliveries.report_deadline(r, report_deadline_s) for r in rels}
            states: dict[str, dict[str, int]] = {}
            silent: dict[str, int] = {}
            for row in await (
                await cur.execute(
                    "SELECT d.release, d.state, count(*) AS n,"
                    " count(*) FILTER (WHERE d.state = ANY(%s)"
                    "   AND d.updated_at <= now() - make_interval(secs => k.deadline)) AS silent"
                    " FROM deliveries d"
                    " JOIN unnest(%s::text[], %s::bigint[], %s::bigint[]) AS k(release, version, deadline)"
                    " ON d.release = k.release AND d.version = k.version GROUP BY d.release, d.state",
                    (list(deliveries.SILENT_STATES), *keys, [deadlines[r.name] for r in rels]),
                )
            ).fetchall():
                states.setdefault(row["release"], {})[row["state"]] = int(row["n"])
                silent[row["release"]] = silent.get(row["release"], 0) + int(row["silent"])
            result_counts = {
                row["release"]: int(row["n"])
                for row in await (
                    await cur.execute(
                        "SELECT r.release, count(*) AS n FROM results r"
                        " JOIN unnest(%s::text[], %s::bigint[]) AS k(release, version)"
                        " ON r.release = k.release AND r.version = k.version GROUP BY r.release",
                        keys,
                    )
                ).fetchall()
            }
            aggregates = {
                row["release"]: (row["body"], int(row["round"]))
                for row in await (
                    await cur.execute(
                        "SELECT a.release, a.body, a.round FROM aggregates a"
                        " JOIN unnest(%s::text[], %s::bigint[]) AS k(release, version)"
                        " ON a.release = k.release AND a.version = k.version",
                        keys,
                    )
                ).fetchall()
            }
            health = await pg_rollouts.health(conn, rels=rels, fleet=fleet)
        return [
            deliveries.release_counts(
                rel,
                fleet=fleet,
                states=states.get(rel.name, {}),
                results=result_counts.get(rel.name, 0),
                aggregate=aggregates.get(rel.name),
                health_json=health.get(rel.name, ""),
                not_reporting=silent.get(rel.name, 0),
                report_deadline_s=deadlines[rel.name],
            )
            for rel in rels
        ]


def _new_release(spec: releases.ReleaseSpec, *, version: int) -> releases.Release:
    return releases.Release(spec=spec, version=version, target=selectors.parse_target(spec.target))


async def _write_deliveries(
    conn: AsyncConnection[Any], reports: Sequence[deliveries.DeliveryReport]
) -> list[BaseException | None]:
    """Check and store a batch of reports in the caller's transaction; one outcome per report.

    The same checks a single report gets (`deliveries.plan_batch`), on the release rows read `FOR SHARE`
    once per batch (one share-locker per release, not one per report), then one
    set-based upsert per round (a round holds at most one report per
    (release, device): a statement may not update a row twice), rows in key
    order so that concurrent batches on other replicas lock them in one order.
    """
    names = sorted({r.release for r in reports})
    cur = conn.cursor(row_factory=dict_row)
    rows = await (
        await cur.execute(
            f"SELECT {pg_rows.RELEASE_COLUMNS} FROM releases WHERE release = ANY(%s) ORDER BY release FOR SHARE",
            (names,),
        )
    ).fetchall()
    rels = {row["release"]: pg_rows.release(row) for row in rows}
    keyed = [(r.release, r.device.device_id) for r in reports if r.release in rels]
    delivered: set[tuple[str, str]] = set()
    if keyed:
        found = await (
            await conn.execute(
                "SELECT d.release, d.device_id FROM deliveries d"
                " JOIN unnest(%s::text[], %s::text[]) AS k(release, device_id)"
                " ON d.release = k.release AND d.device_id = k.device_id",
                ([k[0] for k in keyed], [k[1] for k in keyed]),
            )
        ).fetchall()
        delivered = {(row[0], row[1]) for row in found}
    plan = deliveries.plan_batch(reports, rels=rels, delivered=delivered)
    for batch in plan.rounds:
        for downgrade in (False, True):  # a downgrade may move a delivery back; nothing else may
            rows_ = [r for r in batch if r.downgrade == downgrade]  # in key order
            if not rows_:
                continue
            await conn.execute(
                "INSERT INTO deliveries (release, device_id, version, state, message, installed_at)"
                " SELECT t.release, t.device_id, t.version, t.state, t.message, CASE WHEN t.installed THEN now() END"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::bool[])"
                " AS t(release, device_id, version, state, message, installed)"
                " ON CONFLICT (release, device_id) DO UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state,"
                " message = EXCLUDED.message, updated_at = now(),"
                " installed_at = CASE WHEN deliveries.version = EXCLUDED.version"
                " THEN COALESCE(deliveries.installed_at, EXCLUDED.installed_at) ELSE EXCLUDED.installed_at END"
                " WHERE deliveries.version <= EXCLUDED.version OR %s",
                (
                    [r.release for r in rows_],
                    [r.device_id for r in rows_],
                    [r.version for r in rows_],
                    [r.state for r in rows_],
                    [r.message for r in rows_],
                    [r.installed for r in rows_],
                    downgrade,
                ),
            )
    if plan.device_states:
        ids = sorted(plan.device_states)
        await conn.execute(
            "UPDATE devices SET state = s.state FROM unnest(%s::text[], %s::jsonb[]) AS s(device_id, state)"
            " WHERE devices.device_id = s.device_id",
            (ids, [Jsonb(dict(plan.device_states[i])) for i in ids]),
        )
    return list(plan.outcomes)
