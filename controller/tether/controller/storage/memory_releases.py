"""Releases, deliveries and counts in memory (`contracts.ReleaseLedger`); see `memory` for the why."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Sequence

from tether.common import errors
from tether.controller import deliveries, devices, releases, rollouts, serving, stage_health
from tether.controller.storage import contracts
from tether.controller.storage.memory_tables import DeliveryRow, Tables
from tether.spec import selectors


class MemoryReleases:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def apply_release(self, spec: releases.ReleaseSpec) -> contracts.ApplyOutcome:
        if spec.manifest_digest not in self._t.manifests:
            raise errors.FailedPrecondition(
                f"manifest {spec.manifest_digest} is not stored on the controller; upload the bundle first"
            )
        previous = self._t.releases.get(spec.release)
        spec = releases.effective_spec(previous, spec)
        if previous is None:
            created = self._with_rollout(_new_release(spec, version=1), previous=None)
            self._t.releases[spec.release] = created
            return contracts.ApplyOutcome(release=created, previous=None, changed=True)
        changed = previous.deleted or releases.content_changed(previous.spec, spec)
        version = previous.version + 1 if changed else previous.version
        if not changed and previous.spec == spec:
            return contracts.ApplyOutcome(release=previous, previous=previous, changed=False)  # writes nothing
        updated = self._with_rollout(_new_release(spec, version=version), previous=previous)
        self._t.releases[spec.release] = updated
        return contracts.ApplyOutcome(release=updated, previous=previous, changed=changed)

    def _with_rollout(self, rel: releases.Release, *, previous: releases.Release | None) -> releases.Release:
        columns = rollouts.columns_on_apply(document=rel.spec.rollout, version=rel.version, previous=previous)
        if columns.needs_population(rel.version):
            population = [d.device_id for d in self._fleet() if rel.target.matches(d.facts)]
            now = datetime.datetime.now(datetime.UTC).isoformat()
            columns = columns.advanced(version=rel.version, population=population, now=now)
        return dataclasses.replace(rel, rollout=columns.rollout, rollout_state=columns.state, stable=columns.stable)

    def _fleet(self) -> list[devices.Device]:
        return [row.device() for _, row in sorted(self._t.devices.items()) if not row.revoked]

    async def delete_release(self, release: str) -> releases.Release | None:
        previous = self._t.releases.get(release)
        if previous is None or previous.deleted:
            return None
        self._t.releases[release] = dataclasses.replace(previous, deleted=True)
        return previous

    async def get_release(self, release: str) -> releases.Release | None:
        rel = self._t.releases.get(release)
        return None if rel is None or rel.deleted else rel

    async def list_releases(self) -> list[releases.Release]:
        return [rel for _, rel in sorted(self._t.releases.items()) if not rel.deleted]

    async def release_views(self, device_id: str, *, release: str | None = None) -> list[serving.ReleaseView]:
        out = []
        for name, rel in sorted(self._t.releases.items()):
            if rel.deleted or (release is not None and name != release):
                continue
            row = self._t.deliveries.get((name, device_id))
            out.append(
                serving.ReleaseView(
                    release=rel, has_delivery=row is not None, delivered_version=None if row is None else row.version
                )
            )
        return out

    async def desired_tasks(self, device: devices.Device) -> list[serving.DesiredTask]:
        return serving.desired(await self.release_views(device.device_id), device.facts)

    async def mark_notified(
        self, *, release: str, version: int, device_ids: Sequence[str], downgrade: bool = False
    ) -> None:
        if not device_ids:
            return
        if release not in self._t.releases or any(d not in self._t.devices for d in device_ids):
            raise errors.FailedPrecondition(f"release {release!r} or a device does not exist")  # a foreign key
        for device_id in sorted(device_ids):
            self._notify(release=release, device_id=device_id, version=version, downgrade=downgrade)

    def _notify(self, *, release: str, device_id: str, version: int, downgrade: bool) -> None:
        key = (release, device_id)
        stored = self._t.deliveries.get(key)
        if stored is None or deliveries.notified_moves(
            stored_version=stored.version, version=version, downgrade=downgrade
        ):
            self._t.deliveries[key] = DeliveryRow(version=version, state="notified")

    async def mark_synced(self, *, device_id: str, tasks: Sequence[serving.DesiredTask]) -> None:
        if device_id not in self._t.devices:
            return
        for t in sorted(tasks, key=lambda t: t.release):
            if t.release in self._t.releases:
                self._notify(release=t.release, device_id=device_id, version=t.version, downgrade=t.rollback)

    async def confirm_installed(self, *, device_id: str, installs: Sequence[tuple[str, int]]) -> int:
        moved = 0
        for release, version in installs:
            stored = self._t.deliveries.get((release, device_id))
            if stored is not None and stored.version == version and stored.state in deliveries.UNCONFIRMED_STATES:
                self._t.deliveries[(release, device_id)] = DeliveryRow(
                    version=version, state="installed", installed_at=time.time()
                )
                moved += 1
        return moved

    async def write_reports(self, reports: Sequence[deliveries.DeliveryReport]) -> list[BaseException | None]:
        rels = {r.release: self._t.releases[r.release] for r in reports if r.release in self._t.releases}
        delivered = {k for k in ((r.release, r.device.device_id) for r in reports) if k in self._t.deliveries}
        plan = deliveries.plan_batch(reports, rels=rels, delivered=delivered)
        now = time.time()
        for batch in plan.rounds:
            for row in batch:
                stored = self._t.deliveries.get(row.key)
                installed_at = now if row.installed else None
                if stored is None:
                    self._t.deliveries[row.key] = DeliveryRow(
                        version=row.version, state=row.state, message=row.message, installed_at=installed_at
                    )
                elif deliveries.report_moves(
                    stored_version=stored.version, version=row.version, downgrade=row.downgrade
                ):
                    if stored.version == row.version and stored.installed_at is not None:
                        installed_at = stored.installed_at
                    self._t.deliveries[row.key] = DeliveryRow(
                        version=row.version, state=row.state, message=row.message, installed_at=installed_at
                    )
        for device_id, state in plan.device_states.items():
            if device_id in self._t.devices:
                self._t.devices[device_id].state = dict(state)
        return list(plan.outcomes)

    async def release_counts(
        self, names: Sequence[str] | None = None, *, report_deadline_s: int | None = None
    ) -> list[deliveries.ReleaseCounts]:
        live = {n: r for n, r in self._t.releases.items() if not r.deleted}
        if names is not None:
            for name in names:
                if name not in live:
                    raise errors.NotFound(f"release {name!r} does not exist")
        rels = [live[n] for n in sorted(live) if names is None or n in names]
        fleet = self._fleet()
        now = time.time()
        health = stage_health.release_health(
            rels=rels,
            fleet=fleet,
            deliveries={
                rel.name: {
                    d: stage_health.DeliveryRow(
                        device_id=d,
                        version=row.version,
                        state=row.state,
                        installed_at=row.installed_at,
                        silent_s=max(0.0, now - row.updated_at),
                    )
                    for (r, d), row in self._t.deliveries.items()
                    if r == rel.name
                }
                for rel in rels
            },
            results={rel.name: self._results_of(rel) for rel in rels},
            device_states={d: row.state for d, row in self._t.devices.items() if row.state},
        )
        out = []
        for rel in rels:
            states: dict[str, int] = {}
            deadline = deliveries.report_deadline(rel, report_deadline_s)
            silent = 0
            for (r, _), row in self._t.deliveries.items():
                if r == rel.name and row.version == rel.version:
                    states[row.state] = states.get(row.state, 0) + 1
                    if row.state in deliveries.SILENT_STATES and now - row.updated_at >= deadline:
                        silent += 1
            out.append(
                deliveries.release_counts(
                    rel,
                    fleet=fleet,
                    states=states,
                    results=len(self._results_of(rel)),
                    aggregate=None,  # aggregates are the worker's, on Postgres
                    health_json=health.get(rel.name, ""),
                    not_reporting=silent,
                    report_deadline_s=deadline,
                )
            )
        return out

    def _results_of(self, rel: releases.Release) -> list[stage_health.ResultRecord]:
        return [
            stage_health.ResultRecord(
                device_id=device_id,
                duration_s=float(record.duration_s),
                metrics={str(k): float(v) for k, v in record.metrics.items() if isinstance(v, int | float)},
            )
            for (device_id, _), record in self._t.results.items()
            if record.release == rel.name and record.version == rel.version
        ]


def _new_release(spec: releases.ReleaseSpec, *, version: int) -> releases.Release:
    return releases.Release(spec=spec, version=version, target=selectors.parse_target(spec.target))
