"""Delivery rules: which reports are accepted, how a delivery row moves, and the status counts.

A delivery is one (release, device) row: the version the device was told
about or reported, and its latest state. Writers of deliveries are many
(Notify fan-out, Sync, ReportStatus bursts, results) and run on every
replica, so the rules are stated once here and both storage implementations
apply them: Postgres in set-based upserts, memory in a loop.

- `plan_batch`: each report of a group-committed batch checked on its own
  (unknown release, version out of range, untargeted device), then grouped
  into rounds holding at most one report per (release, device), in order;
- `notified_moves` / `report_moves` / `result_moves`: when a write changes
  an existing row (never backwards, except a staged rollout's downgrade);
- `release_counts`: `GetReleaseStatus` minus what only the hub knows;
  `report_deadline`: how long a told device may stay silent before it
  counts as not reporting (staged or not).

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from tether.common import errors
from tether.controller import devices, releases, rollouts
from tether.spec import staging

DELIVERY_STATES = frozenset(
    {"notified", "downloading", "installed", "running", "succeeded", "failed", "refused", "uninstalled"}
)
# Cumulative funnel: a device that runs or succeeded has, by definition, installed.
INSTALLED_STATES = ("installed", "running", "succeeded")
# States a stored result (the run's success) moves a delivery at the same version out of.
IN_PROGRESS_STATES = ("notified", "downloading", "installed", "running")
# A delivery in these states is waiting for the device: past the report deadline it counts as not
# reporting (the device was told and has said nothing since).
SILENT_STATES = ("notified", "downloading")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeliveryReport:
    """One ReportStatus, as it is queued for its batch."""

    device: devices.Device
    release: str
    version: int
    state: str
    message: str
    device_state: Mapping[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportRow:
    """One accepted report, as it is written: `installed` stamps installed_at, `downgrade` may move a row back."""

    release: str
    device_id: str
    version: int
    state: str
    message: str
    installed: bool
    downgrade: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.release, self.device_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchPlan:
    outcomes: tuple[BaseException | None, ...]  # one per report, in order: None = accepted
    rounds: tuple[tuple[ReportRow, ...], ...]  # each with at most one row per (release, device), in key order
    device_states: Mapping[str, Mapping[str, str]]  # participation state to keep, by device


def plan_batch(
    reports: Sequence[DeliveryReport],
    *,
    rels: Mapping[str, releases.Release],
    delivered: frozenset[tuple[str, str]] | set[tuple[str, str]],
) -> BatchPlan:
    """Check each report of a batch on its own, over the releases read for it and the existing delivery keys.

    A statement may not update a row twice, so reports on one (release, device)
    go to successive rounds, in arrival order.
    """
    outcomes: list[BaseException | None] = []
    rounds: list[dict[tuple[str, str], ReportRow]] = []
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
        row = ReportRow(
            release=r.release,
            device_id=device_id,
            version=r.version,
            state=r.state,
            message=r.message,
            installed=r.state in INSTALLED_STATES,
            downgrade=downgrade,
        )
        for batch in rounds:
            if row.key not in batch:
                break
        else:
            batch = {}
            rounds.append(batch)
        batch[row.key] = row
        if r.device_state:
            device_states[device_id] = r.device_state
        outcomes.append(None)
    return BatchPlan(
        outcomes=tuple(outcomes),
        rounds=tuple(tuple(b[k] for k in sorted(b)) for b in rounds),
        device_states=device_states,
    )


def notified_moves(*, stored_version: int, version: int, downgrade: bool) -> bool:
    """Whether telling a device about `version` moves its delivery (never backwards unless on purpose)."""
    return stored_version < version or (downgrade and stored_version > version)


def report_moves(*, stored_version: int, version: int, downgrade: bool) -> bool:
    """Whether a report moves the delivery: a stale report (older version) changes nothing."""
    return stored_version <= version or downgrade


def result_moves(*, stored_version: int, stored_state: str, version: int) -> bool:
    """Whether a stored result marks the delivery succeeded (newer version, or the same one still in progress)."""
    return stored_version < version or (stored_version == version and stored_state in IN_PROGRESS_STATES)


# States a device's own account of what it has installed (Subscribe's `installed`) moves a delivery out of.
UNCONFIRMED_STATES = ("notified", "downloading")


def confirmed_installs(
    installed: Sequence[tuple[str, int, str]], desired: Sequence[tuple[str, int, str]]
) -> list[tuple[str, int]]:
    """(release, version) a device says it has that is exactly what it is served now (same digest).

    Level-triggered delivery state: what the device holds when it (re)connects
    settles a delivery whose `installed` report was lost (disconnect in flight).
    Only those pairs, and only from `UNCONFIRMED_STATES` (the storage's rule),
    so a later report (succeeded, failed) is never moved back.
    """
    served = {(r, v, d) for r, v, d in desired}
    return sorted({(r, v) for r, v, d in installed if (r, v, d) in served})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseCounts:
    """`GetReleaseStatus` minus what only the hub knows (connected devices).

    Counts are over deliveries at the current version: `notified` is every
    device told about it (whatever it reported since, except uninstalled),
    `installed` is cumulative (installed, running or succeeded), `succeeded`,
    `failed` and `refused` are the devices whose latest report says so.
    `targeted` counts enrolled, non-revoked devices the target matches.
    `not_reporting`: deliveries still in a `SILENT_STATES` state whose row
    has not changed for `report_deadline_s` (staged or not).
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
    health_json: str = ""  # staged rollouts: per-stage health (tether.controller.stage_health)
    not_reporting: int = 0
    report_deadline_s: int = staging.DEFAULT_REPORT_DEADLINE_S


def check_report_deadline(value: int | None) -> int | None:
    """A requested report deadline (`GetReleaseStatusRequest.report_deadline_seconds`), bounds checked."""
    if value is not None and not staging.MIN_REPORT_DEADLINE_S <= value <= staging.MAX_REPORT_DEADLINE_S:
        raise errors.InvalidArgument(
            f"report_deadline_seconds: must be {staging.MIN_REPORT_DEADLINE_S} to {staging.MAX_REPORT_DEADLINE_S}"
        )
    return value


def report_deadline(rel: rollouts.Subject, requested: int | None = None) -> int:
    """Seconds a told device may stay silent: the one asked for, else the rollout document's, else the default.

    Unstaged releases have no rollout document, so their deadline comes with
    the status request (the operator sends the MLTask's
    `spec.rollout.reportDeadlineSeconds`), else the default.
    """
    if requested is not None:
        return requested
    ro = rollouts.effective(rel)
    return staging.DEFAULT_REPORT_DEADLINE_S if ro is None else ro.report_deadline


def release_counts(
    rel: releases.Release,
    *,
    fleet: Sequence[devices.Device],
    states: Mapping[str, int],
    results: int,
    aggregate: tuple[Any, int] | None,
    health_json: str,
    not_reporting: int = 0,
    report_deadline_s: int = staging.DEFAULT_REPORT_DEADLINE_S,
) -> ReleaseCounts:
    """The counts of one release from its deliveries at the current version (`states`: state -> devices)."""
    body, round_ = aggregate if aggregate is not None else (None, 0)
    return ReleaseCounts(
        release=rel.name,
        version=rel.version,
        manifest_digest=rel.manifest_digest,
        targeted=sum(1 for d in fleet if rel.targets(d.facts)),
        notified=sum(n for state, n in states.items() if state != "uninstalled"),
        installed=sum(states.get(state, 0) for state in INSTALLED_STATES),
        succeeded=states.get("succeeded", 0),
        failed=states.get("failed", 0),
        refused=states.get("refused", 0),
        results=results,
        aggregate_json="" if body is None else json.dumps(body, sort_keys=True),
        aggregate_round=round_,
        subject=rel,
        health_json=health_json,
        not_reporting=not_reporting,
        report_deadline_s=report_deadline_s,
    )


def check_report(*, release: str, state: str) -> None:
    """What a report must be before it is queued: a known state, a well-formed release name."""
    if state not in DELIVERY_STATES:
        raise errors.InvalidArgument(f"state: {state!r} is not one of {sorted(DELIVERY_STATES)}")
    if not releases.RELEASE_RE.match(release):
        raise errors.NotFound(f"release {release!r} does not exist")
