"""Rows of the Postgres storage as domain values, and the release reads every Postgres module shares.

Rollout documents are parsed once per distinct document (`functools.lru_cache`):
every device of a rollout reads the same release row within seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

from tether.controller import devices, releases, rollouts, serving, targeting
from tether.spec import staging

if TYPE_CHECKING:
    from psycopg import AsyncConnection

ROLLOUT_COLUMNS = "rollout, rollout_state, stable"  # migration 0004
RELEASE_COLUMNS = (
    "release, version, generation, manifest_digest, target, trigger, aggregation, resources, paused, deleted, "
    "federated, base_manifest, " + ROLLOUT_COLUMNS
)
R_RELEASE_COLUMNS = ", ".join("r." + c.strip() for c in RELEASE_COLUMNS.split(","))
DEVICE_COLUMNS = "device_id, attributes, backends, revoked, backend_choices"
# A release with this device's delivery of it (serving.ReleaseView).
VIEW_SELECT = (
    f"SELECT {R_RELEASE_COLUMNS}, (d.device_id IS NOT NULL) AS delivered, d.version AS delivered_version"
    " FROM releases r LEFT JOIN deliveries d ON d.release = r.release AND d.device_id = %s"
)


def device(row: Mapping[str, Any]) -> devices.Device:
    return devices.Device(
        device_id=row["device_id"],
        attributes=dict(row["attributes"] or {}),
        backends=tuple(row["backends"] or ()),
        revoked=bool(row["revoked"]),
        backend_choices=tuple(devices.BackendChoice.from_json(c) for c in row.get("backend_choices") or ()),
    )


def release(row: Mapping[str, Any]) -> releases.Release:
    spec = releases.ReleaseSpec(
        release=row["release"],
        generation=int(row["generation"]),
        manifest_digest=row["manifest_digest"],
        target=row["target"] or {},
        trigger=row["trigger"] or {},
        aggregation=row["aggregation"] or {},
        resources=row["resources"] or {},
        paused=bool(row["paused"]),
        rollout=row.get("rollout") or {},
        federated=row.get("federated") or {},
        base_manifest=row.get("base_manifest") or "",
    )
    rel = releases.Release(
        spec=spec,
        version=int(row["version"]),
        deleted=bool(row["deleted"]),
        target=targeting.parse_stored(spec.target),
    )
    return _with_rollout(rel, row)


def view(row: Mapping[str, Any]) -> serving.ReleaseView:
    return serving.ReleaseView(
        release=release(row), has_delivery=bool(row["delivered"]), delivered_version=row.get("delivered_version")
    )


def _with_rollout(rel: releases.Release, row: Mapping[str, Any]) -> releases.Release:
    """`rel` with its rollout columns (parsed once per distinct document)."""
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
def _parse_rollout(text: str) -> staging.Rollout | None:
    return staging.parse_rollout(json.loads(text))


@functools.lru_cache(maxsize=1024)
def _parse_state(text: str) -> rollouts.RolloutState:
    return rollouts.RolloutState.from_json(json.loads(text))


@functools.lru_cache(maxsize=1024)
def _parse_stable(text: str) -> rollouts.Stable | None:
    return rollouts.Stable.from_json(json.loads(text))


async def lock_release(conn: AsyncConnection[Any], name: str) -> releases.Release | None:
    """The release row `FOR UPDATE` (deleted ones too)."""
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release = %s FOR UPDATE", (name,))
    ).fetchone()
    return None if row is None else release(row)


async def share_release(conn: AsyncConnection[Any], name: str) -> releases.Release | None:
    """The release row `FOR SHARE` (deleted ones too): it cannot change before the caller commits."""
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release = %s FOR SHARE", (name,))
    ).fetchone()
    return None if row is None else release(row)
