"""The controller's system of record: every SQL statement lives here.

Each public method is one short transaction on a pooled connection. Checks
that decide whether a write is allowed (the manifest exists, the release
targets this device, the version is current) run inside the same transaction,
on rows locked `FOR SHARE` / `FOR UPDATE`, so a concurrent apply cannot slip
between check and write; a refused request raises a `TetherError` and the
transaction rolls back, leaving stored state unchanged.

Targets are evaluated in Python (`tether.controller.targeting`) over rows read
here: target documents are validated before they are stored, so a stored one
always parses.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tether.common import auth, errors, manifest
from tether.controller import devices, groupcommit, releases, rollout_store, rollouts, targeting, uploads

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

DELIVERY_STATES = frozenset(
    {"notified", "downloading", "installed", "running", "succeeded", "failed", "refused", "uninstalled"}
)
# Cumulative funnel: a device that runs or succeeded has, by definition, installed.
INSTALLED_STATES = ("installed", "running", "succeeded")
# A transaction the server rolled back because of other transactions (class 40): worth running again.
_ROLLED_BACK = (
    psycopg.errors.TransactionRollback,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
READABLE_CACHE_S = 2.0
READABLE_CACHE_SIZE = 200_000
_RELEASE_COLUMNS = (
    "release, version, generation, manifest_digest, target, trigger, aggregation, resources, paused, deleted, "
    + rollout_store.COLUMNS
)
_R_RELEASE_COLUMNS = ", ".join("r." + c.strip() for c in _RELEASE_COLUMNS.split(","))


@dataclasses.dataclass(frozen=True)
class DesiredTask:
    """One release as a device should have it: version, manifest, and the policy it runs under."""

    release: str
    version: int
    manifest_digest: str
    trigger: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rollback: bool = False  # an older version on purpose (staged rollouts: the stable one)

    @classmethod
    def of(cls, rel: releases.Release) -> DesiredTask:
        return cls(
            release=rel.name,
            version=rel.version,
            manifest_digest=rel.manifest_digest,
            trigger=rel.spec.trigger,
            resources=rel.spec.resources,
        )

    @classmethod
    def served(cls, s: rollouts.Served) -> DesiredTask:
        return cls(
            release=s.release,
            version=s.version,
            manifest_digest=s.manifest_digest,
            trigger=s.trigger,
            resources=s.resources,
            rollback=s.rollback,
        )


@dataclasses.dataclass(frozen=True)
class StoredManifest:
    digest: str
    body: bytes
    signature: bytes
    key_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApplyOutcome:
    release: releases.Release
    previous: releases.Release | None  # as stored before this apply (possibly deleted), None when new
    changed: bool  # the version was bumped


@dataclasses.dataclass(frozen=True, kw_only=True)
class InsertOutcome:
    duplicate: bool
    release: str  # of the stored row (for a duplicate: of the first upload)
    version: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseCounts:
    """`GetReleaseStatus` minus what only the hub knows (connected devices).

    Counts are over deliveries at the current version: `notified` is every
    device told about it (whatever it reported since, except uninstalled),
    `installed` is cumulative (installed, running or succeeded), `succeeded`,
    `failed` and `refused` are the devices whose latest report says so.
    `targeted` counts enrolled, non-revoked devices the target matches.
    """

    release: str
    version: int
    manifest_digest: str
    targeted: int
    notified: int
    installed: int
    succeeded: int
    failed: int
    refused: int
    results: int
    aggregate_json: str
    aggregate_round: int
    subject: releases.Release = dataclasses.field(compare=False, repr=False)
    health_json: str = ""  # staged rollouts: per-stage health (tether.controller.rollouts.health)


class Store:
    """Postgres-backed registry, manifests, releases, deliveries and results."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._deliveries: groupcommit.GroupCommit[DeliveryReport] = groupcommit.GroupCommit(self._report_batch)
        # (device id, release) -> (monotonic time, device facts, release as readable): see release_for_device.
        self._readable: dict[tuple[str, str], tuple[float, Mapping[str, str], releases.Release]] = {}
        self._readable_epoch = 0
        self._live: dict[str, tuple[float, releases.Release]] = {}  # live releases by name: see release_for_device

    # ------------------------------------------------------------ devices

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
        return _device(row)

    async def device(self, device_id: str) -> devices.Device | None:
        """A registered device as stored (revoked ones too), None when unknown."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    "SELECT device_id, attributes, backends, revoked, backend_choices FROM devices"
                    " WHERE device_id = %s",
                    (device_id,),
                )
            ).fetchone()
        return None if row is None else _device(row)

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

    async def active_devices(self) -> list[devices.Device]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    "SELECT device_id, attributes, backends, revoked, backend_choices FROM devices"
                    " WHERE NOT revoked ORDER BY device_id"
                )
            ).fetchall()
        return [_device(r) for r in rows]

    # ------------------------------------------------------------ blobs and manifests

    async def put_blob(self, *, digest: str, size: int) -> None:
        """Record a blob already verified and stored by the blob store."""
        manifest.check_digest(digest)
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO blobs (digest, size) VALUES (%s, %s) ON CONFLICT (digest) DO NOTHING", (digest, size)
            )

    async def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT digest, size FROM blobs WHERE digest = ANY(%s)", (wanted,))
            ).fetchall()
        return {d: int(s) for d, s in rows}

    async def put_manifest(self, *, body: bytes, signature: bytes = b"", key_id: str = "") -> str:
        """Store a validated manifest whose blobs are all stored; return its digest.

        The digest is computed here from the bytes, never taken on trust. A
        manifest stored again with a non-empty signature takes that signature
        (re-signing with a new key); the content, its address, cannot change.
        """
        parsed = manifest.Manifest.from_bytes(body)
        digest = manifest.sha256_digest(body)
        async with self._pool.connection() as conn, conn.transaction():
            wanted = parsed.blob_digests()
            rows = await (
                await conn.execute("SELECT digest, size FROM blobs WHERE digest = ANY(%s) FOR SHARE", (wanted,))
            ).fetchall()
            sizes = {d: int(s) for d, s in rows}
            missing = [d for d in wanted if d not in sizes]
            if missing:
                raise errors.FailedPrecondition(
                    f"manifest references {len(missing)} blob(s) not uploaded yet, e.g. {missing[0]}"
                )
            for f in parsed.files:
                if sizes[f.sha256] != f.size:
                    raise errors.InvalidManifest(
                        f"files: {f.path} claims {f.size} bytes but blob {f.sha256} has {sizes[f.sha256]}"
                    )
            await conn.execute(
                "INSERT INTO manifests (digest, body, signature, key_id) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (digest) DO UPDATE SET signature = EXCLUDED.signature, key_id = EXCLUDED.key_id"
                " WHERE EXCLUDED.signature <> ''",
                (digest, body, signature, key_id),
            )
        return digest

    async def get_manifest(self, digest: str) -> StoredManifest | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute("SELECT digest, body, signature, key_id FROM manifests WHERE digest = %s", (digest,))
            ).fetchone()
        if row is None:
            return None
        return StoredManifest(digest=row[0], body=bytes(row[1]), signature=bytes(row[2]), key_id=row[3])

    # ------------------------------------------------------------ releases

    async def apply_release(self, spec: releases.ReleaseSpec) -> ApplyOutcome:
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
            previous = await _lock_release(conn, spec.release)
            if previous is None:
                inserted = await (
                    await conn.execute(
                        "INSERT INTO releases (release, version, generation, manifest_digest, target, trigger,"
                        " aggregation, resources, paused) VALUES (%s, 1, %s, %s, %s, %s, %s, %s, %s)"
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
                        ),
                    )
                ).fetchone()
                if inserted is not None:
                    created = await rollout_store.write(conn, rel=_new_release(spec, version=1), previous=None)
                    self.releases_changed()  # before commit, yet nothing readable is cached for a new release
                    return ApplyOutcome(release=created, previous=None, changed=True)
                previous = await _lock_release(conn, spec.release)  # lost a race with a concurrent create
                assert previous is not None
            changed = previous.deleted or releases.content_changed(previous.spec, spec)
            version = previous.version + 1 if changed else previous.version
            if not changed and previous.spec == spec:
                return ApplyOutcome(release=previous, previous=previous, changed=False)  # a no-op writes nothing
            await conn.execute(
                "UPDATE releases SET version = %s, generation = %s, manifest_digest = %s, target = %s,"
                " trigger = %s, aggregation = %s, resources = %s, paused = %s, deleted = false, updated_at = now()"
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
                    spec.release,
                ),
            )
            updated = await rollout_store.write(conn, rel=_new_release(spec, version=version), previous=previous)
        self.releases_changed()
        return ApplyOutcome(release=updated, previous=previous, changed=changed)

    async def delete_release(self, release: str) -> releases.Release | None:
        """Mark a release deleted (results and aggregates stay); return it as it was, None when absent."""
        async with self._pool.connection() as conn, conn.transaction():
            previous = await _lock_release(conn, release)
            if previous is None or previous.deleted:
                return None
            await conn.execute("UPDATE releases SET deleted = true, updated_at = now() WHERE release = %s", (release,))
        self.releases_changed()
        return previous

    async def get_release(self, release: str) -> releases.Release | None:
        """A live (not deleted) release."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE release = %s AND NOT deleted", (release,)
                )
            ).fetchone()
        return None if row is None else _release(row)

    async def list_releases(self) -> list[releases.Release]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE NOT deleted ORDER BY release")
            ).fetchall()
        return [_release(r) for r in rows]

    async def desired_tasks(self, device: devices.Device) -> list[DesiredTask]:
        """Every live release offered to this device (its full desired state)."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (
                await cur.execute(
                    f"SELECT {_R_RELEASE_COLUMNS},"
                    " (d.device_id IS NOT NULL) AS delivered, d.version AS delivered_version"
                    " FROM releases r LEFT JOIN deliveries d ON d.release = r.release AND d.device_id = %s"
                    " WHERE NOT r.deleted ORDER BY r.release",
                    (device.device_id,),
                )
            ).fetchall()
        facts = device.facts
        desired = []
        for row in rows:
            rel = _release(row)
            served = rollouts.served(rel, facts, delivered=_delivered(rel, row))
            if served is not None:
                desired.append(DesiredTask.served(served))
        return desired

    def releases_changed(self) -> None:
        """A release changed (here, or on another replica: `replicas.ReleaseListener`): forget cached answers."""
        self._readable.clear()
        self._live.clear()
        self._readable_epoch += 1

    async def release_for_device(self, device: devices.Device, release: str) -> releases.Release:
        """A release this device may read (manifest, blobs): NotFound / PermissionDenied otherwise.

        Every device of a rollout asks this within the same seconds (PullBlobs,
        GetManifest), so answers are kept in memory for `READABLE_CACHE_S`:

        - the live release itself, by name: for a release that is neither
          paused nor staged, whether a device may read it is its target applied
          to the device's facts, decided here without the database;
        - otherwise (a paused release serves only devices that already have it,
          a staged one serves by cohort and stage), the answer per (device,
          release, device facts), a "yes" only.

        Any release change this process makes or hears of (LISTEN/NOTIFY,
        `releases_changed`) drops everything kept at once; the time-to-live
        bounds staleness should an announcement be missed.
        """
        if not releases.RELEASE_RE.match(release):  # no such release can exist; keep garbage off the database
            raise errors.NotFound(f"release {release!r} does not exist")
        now = time.monotonic()
        live = self._live.get(release)
        if live is None or now - live[0] >= READABLE_CACHE_S:
            epoch = self._readable_epoch
            rel = await self.get_release(release)
            if rel is None:
                raise errors.NotFound(f"release {release!r} does not exist")
            if epoch == self._readable_epoch:  # no change was announced while this read ran
                self._live[release] = (now, rel)
        else:
            rel = live[1]
        if rel.rollout is None and not rel.paused:
            if not rel.targets(device.facts):
                raise errors.PermissionDenied(f"release {release!r} does not target device {device.device_id}")
            return rel
        key = (device.device_id, release)
        hit = self._readable.get(key)
        if hit is not None and now - hit[0] < READABLE_CACHE_S and hit[1] == device.facts:
            return hit[2]
        epoch = self._readable_epoch
        rel = await self._release_for_device(device, release)
        if epoch == self._readable_epoch:
            if len(self._readable) >= READABLE_CACHE_SIZE:
                self._readable.clear()
            self._readable[key] = (now, device.facts, rel)
        return rel

    async def _release_for_device(self, device: devices.Device, release: str) -> releases.Release:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (
                await cur.execute(
                    f"SELECT {_R_RELEASE_COLUMNS},"
                    " (d.device_id IS NOT NULL) AS delivered, d.version AS delivered_version"
                    " FROM releases r LEFT JOIN deliveries d ON d.release = r.release AND d.device_id = %s"
                    " WHERE r.release = %s AND NOT r.deleted",
                    (device.device_id, release),
                )
            ).fetchone()
        if row is None:
            raise errors.NotFound(f"release {release!r} does not exist")
        rel = _release(row)
        served = rollouts.served(rel, device.facts, delivered=_delivered(rel, row))
        if served is None:
            raise errors.PermissionDenied(f"release {release!r} does not target device {device.device_id}")
        if served.manifest_digest != rel.manifest_digest:
            # A staged rollout serves this device the stable version: it reads that version's content.
            rel = dataclasses.replace(rel, spec=dataclasses.replace(rel.spec, manifest_digest=served.manifest_digest))
        return rel

    # ------------------------------------------------------------ deliveries

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

    async def mark_synced(self, *, device_id: str, tasks: Sequence[DesiredTask]) -> None:
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

    async def report_delivery(
        self,
        *,
        device: devices.Device,
        release: str,
        version: int,
        state: str,
        message: str = "",
        device_state: Mapping[str, str] | None = None,
    ) -> None:
        """Keep the latest state a device reports; a stale report (older version) changes nothing.

        A report on the version a staged rollout serves this device (its stable
        version, older than the current one) is not stale: it moves the delivery
        back. `device_state`: the device's participation state, kept on the device.

        Reports that arrive together are written together (`groupcommit`): one
        transaction for a batch, each report still checked on its own and
        refused on its own. This returns once the report's batch committed.
        """
        if state not in DELIVERY_STATES:
            raise errors.InvalidArgument(f"state: {state!r} is not one of {sorted(DELIVERY_STATES)}")
        if not releases.RELEASE_RE.match(release):
            raise errors.NotFound(f"release {release!r} does not exist")
        report = DeliveryReport(
            device=device,
            release=release,
            version=version,
            state=state,
            message=message,
            device_state=rollout_store.check_device_state(device_state or {}),
        )
        await self._deliveries.submit(report)

    async def _report_batch(self, reports: Sequence[DeliveryReport]) -> list[BaseException | None]:
        """One transaction for the batch; each report alone when the database refuses it (to find the bad one).

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

    # ------------------------------------------------------------ results

    async def insert_result(self, *, device: devices.Device, record: uploads.ResultRecord) -> InsertOutcome:
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
                return InsertOutcome(duplicate=True, release=existing[0], version=int(existing[1]))
            rel = await _share_release(conn, record.release)
            if rel is None or rel.deleted:
                raise errors.NotFound(f"release {record.release!r} does not exist")
            if not rel.targets(device.facts):
                raise errors.PermissionDenied(f"release {record.release!r} does not target device {device.device_id}")
            stable = rel.stable.version if rel.stable is not None else rel.version - 1  # staged: what others keep
            if record.version not in (rel.version, rel.version - 1, stable):
                raise errors.FailedPrecondition(
                    f"release {record.release!r} is at version {rel.version}; results are accepted for versions "
                    f"{rel.version} and {rel.version - 1}, not {record.version}"
                )
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
        return InsertOutcome(duplicate=inserted is None, release=record.release, version=record.version)

    # ------------------------------------------------------------ status

    async def release_counts(self, names: Sequence[str] | None = None) -> list[ReleaseCounts]:
        """Status counts of the named live releases (all when None); NotFound for an unknown name."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            if names is None:
                await cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE NOT deleted ORDER BY release")
            else:
                await cur.execute(
                    f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE NOT deleted AND release = ANY(%s) ORDER BY release",
                    (list(names),),
                )
            rels = [_release(r) for r in await cur.fetchall()]
            if names is not None:
                found = {r.name for r in rels}
                for name in names:
                    if name not in found:
                        raise errors.NotFound(f"release {name!r} does not exist")
            if not rels:
                return []
            fleet = [
                _device(r)
                for r in await (
                    await cur.execute(
                        "SELECT device_id, attributes, backends, revoked, backend_choices FROM devices"
                        " WHERE NOT revoked"
                    )
                ).fetchall()
            ]
            keys = ([r.name for r in rels], [r.version for r in rels])
            states: dict[str, dict[str, int]] = {}
            for row in await (
                await cur.execute(
                    "SELECT d.release, d.state, count(*) AS n FROM deliveries d"
                    " JOIN unnest(%s::text[], %s::bigint[]) AS k(release, version)"
                    " ON d.release = k.release AND d.version = k.version GROUP BY d.release, d.state",
                    keys,
                )
            ).fetchall():
                states.setdefault(row["release"], {})[row["state"]] = int(row["n"])
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
            health = await rollout_store.health(conn, rels=rels, fleet=fleet)
        out = []
        for rel in rels:
            s = states.get(rel.name, {})
            body, round_ = aggregates.get(rel.name, (None, 0))
            out.append(
                ReleaseCounts(
                    release=rel.name,
                    version=rel.version,
                    manifest_digest=rel.manifest_digest,
                    targeted=sum(1 for d in fleet if rel.targets(d.facts)),
                    notified=sum(n for state, n in s.items() if state != "uninstalled"),
                    installed=sum(s.get(state, 0) for state in INSTALLED_STATES),
                    succeeded=s.get("succeeded", 0),
                    failed=s.get("failed", 0),
                    refused=s.get("refused", 0),
                    results=result_counts.get(rel.name, 0),
                    aggregate_json="" if body is None else json.dumps(body, sort_keys=True),
                    aggregate_round=round_,
                    subject=rel,
                    health_json=health.get(rel.name, ""),
                )
            )
        return out


# ---------------------------------------------------------------- row mapping


def _device(row: Mapping[str, Any]) -> devices.Device:
    return devices.Device(
        device_id=row["device_id"],
        attributes=dict(row["attributes"] or {}),
        backends=tuple(row["backends"] or ()),
        revoked=bool(row["revoked"]),
        backend_choices=tuple(devices.BackendChoice.from_json(c) for c in row.get("backend_choices") or ()),
    )


def _release(row: Mapping[str, Any]) -> releases.Release:
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
    )
    rel = releases.Release(
        spec=spec,
        version=int(row["version"]),
        deleted=bool(row["deleted"]),
        target=targeting.parse_stored(spec.target),
    )
    return rollout_store.from_row(rel, row)


def _delivered(rel: releases.Release, row: Mapping[str, Any]) -> bool:
    """Whether the device already has the release (staged: at its current version), for pause semantics."""
    if rel.rollout is None:
        return bool(row["delivered"])
    return row.get("delivered_version") == rel.version


def _new_release(spec: releases.ReleaseSpec, *, version: int) -> releases.Release:
    return releases.Release(spec=spec, version=version, target=targeting.parse_target(spec.target))


async def _lock_release(conn: AsyncConnection[Any], release: str) -> releases.Release | None:
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE release = %s FOR UPDATE", (release,))
    ).fetchone()
    return None if row is None else _release(row)


async def _share_release(conn: AsyncConnection[Any], release: str) -> releases.Release | None:
    cur = conn.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE release = %s FOR SHARE", (release,))
    ).fetchone()
    return None if row is None else _release(row)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeliveryReport:
    """One ReportStatus, as `report_delivery` queues it for its batch."""

    device: devices.Device
    release: str
    version: int
    state: str
    message: str
    device_state: Mapping[str, str]


async def _write_deliveries(
    conn: AsyncConnection[Any], reports: Sequence[DeliveryReport]
) -> list[BaseException | None]:
    """Check and store a batch of reports in the caller's transaction; one outcome per report.

    The same checks a single report gets, on the release rows read `FOR SHARE`
    once per batch (one share-locker per release, not one per report), then one
    set-based upsert per round (a round holds at most one report per
    (release, device): a statement may not update a row twice), rows in key
    order so that concurrent batches on other replicas lock them in one order.
    """
    names = sorted({r.release for r in reports})
    cur = conn.cursor(row_factory=dict_row)
    rows = await (
        await cur.execute(
            f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE release = ANY(%s) ORDER BY release FOR SHARE", (names,)
        )
    ).fetchall()
    rels = {row["release"]: _release(row) for row in rows}
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
    outcomes: list[BaseException | None] = []
    rounds: list[dict[tuple[str, str], tuple[Any, ...]]] = []
    device_states: dict[str, Mapping[str, str]] = {}
    for r in reports:
        rel = rels.get(r.release)
        device_id = r.device.device_id
        if rel is None:
            outcomes.append(errors.NotFound(f"release {r.release!r} does not exist"))
            continue
        if not 1 <= r.version <= rel.version:
            outcomes.append(
                errors.FailedPrecondition(f"release {r.release!r} has no version {r.version} (current {rel.version})")
            )
            continue
        # A device may still report on a release it held before it was untargeted or deleted (uninstalls).
        if (r.release, device_id) not in delivered and not rel.targets(r.device.facts):
            outcomes.append(errors.PermissionDenied(f"release {r.release!r} does not target device {device_id}"))
            continue
        served = rollouts.served(rel, r.device.facts, delivered=True) if rel.rollout is not None else None
        downgrade = served is not None and served.rollback and served.version == r.version
        key = (r.release, device_id)
        for batch in rounds:
            if key not in batch:
                break
        else:
            batch = {}
            rounds.append(batch)
        batch[key] = (r.version, r.state, r.message, r.state in INSTALLED_STATES, downgrade)
        if r.device_state:
            device_states[device_id] = r.device_state
        outcomes.append(None)
    for batch in rounds:
        for downgrade in (False, True):  # a downgrade may move a delivery back; nothing else may
            keys = sorted(k for k, v in batch.items() if v[4] == downgrade)
            if not keys:
                continue
            values = [batch[k] for k in keys]
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
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [v[0] for v in values],
                    [v[1] for v in values],
                    [v[2] for v in values],
                    [v[3] for v in values],
                    downgrade,
                ),
            )
    if device_states:
        ids = sorted(device_states)
        await conn.execute(
            "UPDATE devices SET state = s.state FROM unnest(%s::text[], %s::jsonb[]) AS s(device_id, state)"
            " WHERE devices.device_id = s.device_id",
            (ids, [Jsonb(dict(device_states[i])) for i in ids]),
        )
    return outcomes
