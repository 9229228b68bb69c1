"""The SQL of staged rollouts, run inside `store.Store`'s transactions.

Kept apart from `store.py` so the rollout columns (migration 0004:
`releases.rollout`, `rollout_state`, `stable`; `deliveries.installed_at`;
`devices.state`) are read and written in one place. Every function takes the
connection of a transaction the caller holds; the decisions are the pure ones
of `tether.controller.rollouts`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tether.controller import devices, releases, rollouts, targeting

if TYPE_CHECKING:
    from psycopg import AsyncConnection

COLUMNS = "rollout, rollout_state, stable"  # appended to store._RELEASE_COLUMNS


def from_row(rel: releases.Release, row: Mapping[str, Any]) -> releases.Release:
    """`rel` (read by store._release) with its rollout columns (parsed once per distinct document)."""
    rollout = _cached(_parse_rollout, row.get("rollout"))
    if rollout is None and not row.get("stable"):
        return rel
    return dataclasses.replace(
        rel,
        rollout=rollout,
        rollout_state=_cached(_parse_state, row.get("rollout_state")),
        stable=_cached(_parse_stable, row.get("stable")),
    )


def _cached(parse: Any, doc: Any) -> Any:
    return parse(json.dumps(doc or {}, sort_keys=True, separators=(",", ":")))


@functools.lru_cache(maxsize=1024)
def _parse_rollout(text: str) -> rollouts.Rollout | None:
    return rollouts.parse_rollout(json.loads(text))


@functools.lru_cache(maxsize=1024)
def _parse_state(text: str) -> rollouts.RolloutState:
    return rollouts.RolloutState.from_json(json.loads(text))


@functools.lru_cache(maxsize=1024)
def _parse_stable(text: str) -> rollouts.Stable | None:
    return rollouts.Stable.from_json(json.loads(text))


async def write(
    conn: AsyncConnection[Any], *, rel: releases.Release, previous: releases.Release | None
) -> releases.Release:
    """Store the rollout columns of an applied release; return it with them.

    A version bump computes the stable version (`rollouts.next_stable`); a
    stage not begun before fixes its threshold over the devices targeted now.
    """
    rollout = rollouts.parse_rollout(rel.spec.rollout or {})
    live_previous = previous if previous is not None and not previous.deleted else None
    bumped = live_previous is None or live_previous.version != rel.version
    stable = rollouts.next_stable(live_previous) if bumped else live_previous.stable  # type: ignore[union-attr]
    state = live_previous.rollout_state if live_previous is not None else rollouts.RolloutState()
    if rollout is None:
        state = rollouts.RolloutState()
    elif rollouts.needs_population(state, rollout, rel.version):
        population = await targeted_ids(conn, rel.target)
        now = (await (await conn.execute("SELECT now()")).fetchone())[0]  # type: ignore[index]
        state = rollouts.advance_state(state, rollout, version=rel.version, population=population, now=now.isoformat())
    await conn.execute(
        "UPDATE releases SET rollout = %s, rollout_state = %s, stable = %s WHERE release = %s",
        (
            Jsonb({} if rollout is None else rollout.to_json()),
            Jsonb(state.to_json() if rollout is not None else {}),
            None if stable is None else Jsonb(stable.to_json()),
            rel.name,
        ),
    )
    return dataclasses.replace(rel, rollout=rollout, rollout_state=state, stable=stable)


async def targeted_ids(conn: AsyncConnection[Any], target: targeting.Target) -> list[str]:
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


async def save_device_state(conn: AsyncConnection[Any], *, device_id: str, state: Mapping[str, str]) -> None:
    """Keep the participation state a device reported (ReportStatus.device_state); empty changes nothing."""
    if state:
        await conn.execute("UPDATE devices SET state = %s WHERE device_id = %s", (Jsonb(dict(state)), device_id))


def check_device_state(state: Mapping[str, str]) -> dict[str, str]:
    """Only the known participation keys, with short values; anything else is dropped."""
    return {k: str(v)[:16] for k, v in state.items() if k in rollouts.CONDITION_KEYS}


async def health(
    conn: AsyncConnection[Any], *, rels: Sequence[releases.Release], fleet: Sequence[devices.Device]
) -> dict[str, str]:
    """`ReleaseStatus.health_json` of every staged release among `rels` (the others are left out)."""
    staged = [r for r in rels if r.rollout is not None]
    if not staged:
        return {}
    cur = conn.cursor(row_factory=dict_row)
    names = [r.name for r in staged]
    deliveries: dict[str, dict[str, dict[str, Any]]] = {}
    for row in await (
        await cur.execute(
            "SELECT release, device_id, version, state, extract(epoch FROM installed_at) AS installed_at"
            " FROM deliveries WHERE release = ANY(%s)",
            (names,),
        )
    ).fetchall():
        deliveries.setdefault(row["release"], {})[row["device_id"]] = row
    results: dict[str, list[rollouts.ResultRecord]] = {}
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
            rollouts.ResultRecord(device_id=row["device_id"], duration_s=float(row["duration_s"]), metrics=metrics)
        )
    states = {
        row["device_id"]: row["state"] or {}
        for row in await (await cur.execute("SELECT device_id, state FROM devices WHERE state <> '{}'")).fetchall()
    }
    out = {}
    for rel in staged:
        conditions = rel.spec.trigger.get("conditions") or {}
        mine = deliveries.get(rel.name, {})
        records = []
        for device in fleet:
            facts = device.facts
            if not rel.target.matches(facts):
                continue
            d = mine.get(device.device_id) or {}
            records.append(
                rollouts.DeviceRecord(
                    device_id=device.device_id,
                    stage=rollouts.stage_of(rel, facts),
                    version=d.get("version"),
                    state=d.get("state"),
                    installed_at=None if d.get("installed_at") is None else float(d["installed_at"]),
                    waiting=not rollouts.conditions_met(conditions, states.get(device.device_id, {})),
                )
            )
        started = {
            j: datetime.datetime.fromisoformat(s.started_at).timestamp() for j, s in rel.rollout_state.stages.items()
        }
        doc = rollouts.health(rel, devices=records, results=results.get(rel.name, []), stage_started=started)
        out[rel.name] = json.dumps(doc, sort_keys=True)
    return out
