"""What the controller needs of its storage: one Protocol per aggregate, with the values they exchange.

Aggregates, as the data is owned and locked:

- `DeviceRegistry`: devices and their credentials (and the secrets the
  replicas share);
- `BundleCatalog`: blob metadata and manifests (the blob bytes live in the
  blob store, `tether.controller.blobs`);
- `ReleaseLedger`: releases with their rollout state, the deliveries
  (who was told what, and what they reported) and the status counts;
- `ResultLog`: device results (aggregates are written by the Celery worker);
- `RoundBook`: federated rounds, their participants and the updates each
  accepted (the state machine is `tether.controller.fl.rounds`).

Every method states what it MUST do; the contract tests
(tests/controller/test_storage_contract.py) hold both implementations to it.
Two rules hold everywhere: a refused call raises a typed `TetherError` and
changes nothing, and a call that returned has committed. Decisions that need
no storage (who is served what, who may read what, how a report moves a
delivery) are pure functions elsewhere (`serving`, `deliveries`,
`rollouts`), which both implementations call.

Pure: no I/O (Protocols and values only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from tether.common import auth
from tether.controller import deliveries, devices, releases, serving, uploads
from tether.controller.fl import rounds
from tether.spec import federation


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


class DeviceRegistry(Protocol):
    """Devices and credentials."""

    async def enroll_device(self, *, device_id: str, info: devices.DeviceInfo) -> auth.Credential:
        """Register a device, or rotate the credential of a known one, with the attributes given.

        MUST store only the secret's hash; MUST make an older credential of the
        device stop working; MUST refuse a revoked device (PermissionDenied): a
        revoked device stays revoked.
        """
        ...

    async def authenticate_device(self, credential: auth.Credential) -> devices.Device:
        """The device the credential belongs to.

        MUST raise Unauthenticated, with the same message, for an unknown device
        and a wrong secret (no probing); for a revoked device MUST raise
        Unauthenticated saying so.
        """
        ...

    async def device(self, device_id: str) -> devices.Device | None:
        """A registered device as stored (revoked ones too); MUST return None when unknown."""
        ...

    async def set_backend_choices(
        self,
        *,
        device_id: str,
        choices: Iterable[devices.BackendChoice],
        fingerprint: str,
        backends: Iterable[str],
    ) -> None:
        """MUST replace the device's backend choices and probed backends (ReportBackends); unknown: no-op."""
        ...

    async def touch_device(self, device_id: str) -> None:
        """Record that the device was seen now; MUST change nothing else."""
        ...

    async def device_connected(self, device_id: str, replica_id: str) -> None:
        """The device opened its stream on `replica_id`: seen now, and its connected replica; unknown: no-op."""
        ...

    async def device_disconnected(self, device_id: str, replica_id: str) -> None:
        """Its stream on `replica_id` ended: MUST clear the connected replica only if it still is `replica_id`."""
        ...

    async def revoke_device(self, device_id: str) -> bool:
        """Revoke for good: MUST return True when it was live, False when already revoked; NotFound when unknown."""
        ...

    async def not_live(self, device_ids: Iterable[str]) -> set[str]:
        """MUST return those of `device_ids` that are revoked or not enrolled."""
        ...

    async def rotate_credential(self, device_id: str) -> auth.Credential:
        """A new secret for a live device; the previous one MUST stop working at once.

        MUST raise Unauthenticated for a revoked or unknown device.
        """
        ...

    async def controller_secret(self, name: str, *, generate: Callable[[], bytes]) -> bytes:
        """A secret shared by every replica: MUST return the first one ever stored under `name` (race-safe)."""
        ...

    async def active_devices(self) -> list[devices.Device]:
        """MUST return every enrolled, non-revoked device, ordered by device id."""
        ...

    async def list_devices(
        self, *, after: str = "", limit: int, include_revoked: bool = False
    ) -> list[devices.InventoryEntry]:
        """At most `limit` devices whose id sorts after `after`, ordered by device id (a page of the inventory).

        MUST leave out revoked devices unless `include_revoked`; each entry MUST carry the device's
        last-seen time and its deliveries (release, version, state), ordered by release.
        """
        ...


class BundleCatalog(Protocol):
    """Blob metadata and manifests (content-addressed: the address never changes its content)."""

    async def put_blob(self, *, digest: str, size: int) -> None:
        """Record a blob the blob store verified and holds; MUST keep the first record of a digest."""
        ...

    async def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        """MUST return the recorded size of each of `digests` that is recorded (others left out)."""
        ...

    async def put_manifest(self, *, body: bytes, signature: bytes = b"", key_id: str = "") -> str:
        """Store a valid manifest whose blobs are all recorded; return its digest.

        MUST compute the digest from the bytes; MUST refuse a manifest naming an
        unrecorded blob (FailedPrecondition) or claiming another size than the
        recorded one (InvalidManifest), storing nothing. Stored again with a
        non-empty signature, it MUST take that signature; with an empty one it
        MUST keep the signature it had.
        """
        ...

    async def get_manifest(self, digest: str) -> StoredManifest | None:
        """MUST return the stored manifest, None when not stored."""
        ...


class ReleaseLedger(Protocol):
    """Releases (with rollout state), deliveries, and their counts."""

    async def apply_release(self, spec: releases.ReleaseSpec) -> ApplyOutcome:
        """Create or update a release.

        MUST refuse an unknown manifest digest (FailedPrecondition, nothing
        stored); MUST bump the version only when content or policy changed
        (`releases.content_changed`) or the release was deleted (revived);
        an apply identical to what is stored MUST write nothing. The rollout
        columns follow `rollouts.columns_on_apply`, a stage beginning now fixed
        over the devices targeted now. Concurrent first applies MUST create one
        release.
        """
        ...

    async def delete_release(self, release: str) -> releases.Release | None:
        """Mark a release deleted (results stay): MUST return it as it was, None when absent or deleted already."""
        ...

    async def get_release(self, release: str) -> releases.Release | None:
        """MUST return the live (not deleted) release, None otherwise."""
        ...

    async def list_releases(self) -> list[releases.Release]:
        """MUST return every live release, ordered by name."""
        ...

    async def release_views(self, device_id: str, *, release: str | None = None) -> list[serving.ReleaseView]:
        """Every live release (or just `release`) with this device's delivery of it, ordered by name."""
        ...

    async def desired_tasks(self, device: devices.Device) -> list[serving.DesiredTask]:
        """MUST return `serving.desired` over `release_views` of the device: its full desired state."""
        ...

    async def mark_notified(
        self, *, release: str, version: int, device_ids: Sequence[str], downgrade: bool = False
    ) -> None:
        """Record that these devices were told about `version`, by `deliveries.notified_moves`.

        A moved delivery MUST become `notified` with no message and no install time.
        """
        ...

    async def mark_synced(self, *, device_id: str, tasks: Sequence[serving.DesiredTask]) -> None:
        """Record a Sync's tasks as notified (same rule; a task's `rollback` is its downgrade).

        Tasks of releases that do not exist MUST be ignored.
        """
        ...

    async def confirm_installed(self, *, device_id: str, installs: Sequence[tuple[str, int]]) -> int:
        """Mark (release, version) installed for a device whose delivery at that version is still unconfirmed.

        Only rows at exactly that version in `deliveries.UNCONFIRMED_STATES` MUST move (to
        `installed`, stamping installed_at); any other row, and unknown releases, MUST be left
        alone. Idempotent. Returns the rows moved.
        """
        ...

    async def write_reports(self, reports: Sequence[deliveries.DeliveryReport]) -> list[BaseException | None]:
        """Store a batch of delivery reports; MUST return one outcome per report, in order.

        Each report MUST be checked on its own (`deliveries.plan_batch`); a
        refused report (its exception as outcome) MUST leave no trace, and MUST
        NOT keep the others from being stored. Accepted reports move their
        delivery by `deliveries.report_moves`, in order; a non-empty
        `device_state` replaces the device's participation state.
        """
        ...

    async def release_counts(
        self, names: Sequence[str] | None = None, *, report_deadline_s: int | None = None
    ) -> list[deliveries.ReleaseCounts]:
        """Status counts of the named live releases (all when None), ordered by name.

        MUST raise NotFound for a name that is not a live release. `not_reporting`
        MUST count deliveries at the current version in `deliveries.SILENT_STATES`
        unchanged for `deliveries.report_deadline(rel, report_deadline_s)` seconds
        (on the clock that stamps the rows), staged or not.
        """
        ...


class ResultLog(Protocol):
    """Device results."""

    async def insert_result(self, *, device: devices.Device, record: uploads.ResultRecord) -> InsertOutcome:
        """Store a result once per (device, idempotency key); a replay MUST answer `duplicate=True`.

        A replay MUST be recognised before any other check (harmless even after
        the release moved on). A new result MUST pass `uploads.refusal`; when
        stored, the device's delivery MUST move to `succeeded` by
        `deliveries.result_moves`, in the same transaction.
        """
        ...


class RoundBook(Protocol):
    """Federated rounds: one row per (task, round number) with its participants, moved by `fl.rounds`."""

    async def create_round(self, r: rounds.Round) -> None:
        """Store a new round (its participants too, when it has selected them).

        MUST refuse (FailedPrecondition) a (task, number) that exists, and a new
        round while another round of the task is live (not Published/Failed).
        """
        ...

    async def round(self, *, task: str, number: int) -> rounds.Round | None:
        """The round as stored: participants in draw order, received in arrival order; None when unknown."""
        ...

    async def latest_round(self, *, task: str) -> rounds.Round | None:
        """The task's round with the highest number; None when it has none."""
        ...

    async def update_round(self, r: rounds.Round, *, expected: rounds.Phase) -> rounds.Round:
        """Store a round's phase, deadline, target, quorum, extensions and reason; its participants once.

        MUST raise NotFound for an unknown round; MUST refuse (FailedPrecondition,
        nothing changed) when the stored phase is not `expected` (another
        replica moved the round meanwhile), when `expected -> r.phase` is not an
        allowed transition, or when it would change participants already
        selected. MUST NOT write the received updates or the refused/late counts
        (only `admit_update` does: a stale copy cannot undo them). Returns the
        round as now stored.
        """
        ...

    async def admit_update(
        self,
        *,
        task: str,
        number: int,
        device: str,
        rules: federation.Federation,
        now: float,
        update: rounds.UpdateRecord | None = None,
    ) -> rounds.Verdict:
        """Judge one device's update by `rounds.admit` on the stored round, and record the verdict atomically.

        MUST raise NotFound for an unknown round. An accepted update MUST be
        recorded (arrival order kept, and `update`, the blob it is stored in,
        in the same transaction) with the phase it moves the round to; a
        refused one MUST only count (`refused` and `refusals` per reason, or
        `late` when kept, `update` then kept too) — the same device's second
        update is refused as a duplicate, also under concurrency.
        """
        ...

    async def count_refusal(self, *, task: str, number: int, reason: str) -> rounds.Round:
        """Count an update refused for its content (`refused`, `refusals[reason]`); NotFound for an unknown round."""
        ...

    async def accepted_updates(self, *, task: str, number: int) -> list[rounds.UpdateRecord]:
        """The round's accepted updates in device-id order (the fixed fold order); late ones left out."""
        ...

    async def publish_round(self, *, task: str, number: int, result: rounds.RoundResult) -> bool:
        """Move an Aggregating round to Published with its result, atomically; False when it was published already.

        MUST refuse (FailedPrecondition) a round in any other phase and raise
        NotFound for an unknown one; a second call changes nothing (a
        redelivered aggregation counts once).
        """
        ...

    async def mark_served(self, *, task: str, number: int, manifest: str, version: int) -> None:
        """Record the bundle version that serves a published round's model (its result's manifest and version)."""
        ...

    async def round_result(self, *, task: str, number: int) -> rounds.RoundResult | None:
        """What a published round produced; None before."""
        ...

    async def rounds_of(self, *, task: str) -> list[rounds.Round]:
        """Every round of the task, by number."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Storage:
    """The aggregates of one storage (all Postgres on one database, or all memory)."""

    devices: DeviceRegistry
    bundles: BundleCatalog
    releases: ReleaseLedger
    results: ResultLog
    rounds: RoundBook
