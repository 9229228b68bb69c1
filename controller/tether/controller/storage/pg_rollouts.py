"""The SQL of staged rollouts, run inside `pg_releases`' transactions.

The rollout columns (migration 0004: `releases.rollout`, `rollout_state`,
`stable`; `deliveries.installed_at`; `devices.state`) are read and written
here only. Every function takes the connection of a transaction the caller
holds; the decisions are the pure ones of `tether.controller.rollouts` and
`tether.controller.stage_health`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tether.controller import devices, releases, rollouts, stage_health, targeting
from tether.spec import selectors

if TYPE_CHECKING:
    from psycopg import AsyncConnection


async def write(
    conn: AsyncConnection[Any], *, rel: releases.Release, previous: releases.Release | None
) -> releases.Release:
    """Store the rollout columns of an applied release (`rollouts.columns_on_apply`); return it with them.

    A stage not begun before fixes its threshold over the devices targeted now, at the database's clock.
    """
    columns = rollouts.columns_on_apply(document=rel.spec.rollout, version=rel.version, previous=previous)
    if columns.needs_population(rel.version):
        population = await targeted_ids(conn, rel.target)
        now = (await (await conn.execute("SELECT now()")).fetchone())[0]  # type: ignore[index]
        columns = columns.advanced(version=rel.version, population=population, now=now.isoformat())
    await conn.execute(
        "UPDATE releases SET rollout = %s, rollout_state = %s, stable = %s WHERE release = %s",
        (
            Jsonb({} if columns.rollout is None else columns.rollout.to_json()),
            Jsonb(columns.state.to_json() if columns.rollout is not None else {}),
            None if columns.stable is None else Jsonb(columns.stable.to_json()),
            rel.name,
        ),
    )
    return dataclasses.replace(rel, rollout=columns.rollout, rollout_state=columns.state, stable=columns.stable)


async def targeted_ids(conn: AsyncConnection[Any], target: selectors.Target) -> list[str]:
    cur = conn.cursor(row_factory=dict_row)
    rows = await (await cur.execute("SELECT device_id, attributes, backends FROM devices WHERE NOT revoked")).fetchall()
    out = []
    for r in rows:
        facts = targeting.device_facts(
            device_id=r["device_id"], attributes=r["attributes"] or {}, backends=r["backends"] or ()
        )
        if target.matches(facts):
            out.append(r["device_id"])
    return out


async def health(
    conn: AsyncConnection[Any], *, rels: Sequence[releases.Release], fleet: Sequence[devices.Device]
) -> dict[str, str]:
    """`ReleaseStatus.health_json` of every staged release among `rels` (the others are left out)."""
    staged = [r for r in rels if r.rollout is not None]
    if not staged:
        return {}
    cur = conn.cursor(row_factory=dict_row)
    names = [r.name for r in staged]
    delivered: dict[str, dict[str, stage_health.DeliveryRow]] = {}
    for row in await (
        await cur.execute(
            "SELECT release, device_id, version, state, extract(epoch FROM installed_at) AS installed_at,"
            " extract(epoch FROM now() - updated_at) AS silent_s"  # the database's clock on both sides
            " FROM deliveries WHERE release = ANY(%s)",
            (names,),
        )
    ).fetchall():
        delivered.setdefault(row["release"], {})[row["device_id"]] = stage_health.DeliveryRow(
            device_id=row["device_id"],
            version=int(row["version"]),
            state=row["state"],
            installed_at=None if row["installed_at"] is None else float(row["installed_at"]),
            silent_s=max(0.0, float(row["silent_s"])),
        )
    results: dict[str, list[stage_health.ResultRecord]] = {}
    for row in await (
        await cur.execute(
            "SELECT r.release, r.device_id, r.duration_s, r.metrics FROM results r"
            " JOIN unnest(%s::text[], %s::bigint[]) AS k(release, version)"
            " ON r.release = k.release AND r.version = k.version",
            (names, [r.version for r in staged]),
        )
    ).fetchall():
        metrics = {str(k): float(v) for k, v in (row["metrics"] or {}).items() if isinstance(v, int | float)}
        results.setdefault(row["release"], []).append(
            stage_health.ResultRecord(device_id=row["device_id"], duration_s=float(row["duration_s"]), metrics=metrics)
        )
    states = {
        row["device_id"]: row["state"] or {}
        for row in await (await cur.execute("SELECT device_id, state FROM devices WHERE state <> '{}'")).fetchall()
    }
    return stage_health.release_health(
        rels=staged, fleet=fleet, deliveries=delivered, results=results, device_states=states
    )
