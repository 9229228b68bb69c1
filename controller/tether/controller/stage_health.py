"""Per-stage health of a staged rollout (`ReleaseStatus.health_json`): what the operator's gates read.

Apart from `rollouts` (which decides what each device is served) because
health is read, not decided: it folds what storage returns about deliveries,
results and device states into one document per release. Both storage
implementations (Postgres and memory) hand their rows to `release_health`,
so the maths is written once.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from tether.controller import devices, rollouts
from tether.controller.deliveries import SILENT_STATES
from tether.spec import triggers

COVERAGE_QUANTILES = (0.5, 0.9, 0.99)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeliveryRow:
    """One delivery of a staged release as storage returns it (for health)."""

    device_id: str
    version: int
    state: str
    installed_at: float | None = None  # epoch seconds
    silent_s: float = 0.0  # seconds since the row last changed (notified, or the device's last report)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRecord:
    """What the store knows of one targeted device, for health."""

    device_id: str
    stage: int | None  # earliest stage reaching it
    version: int | None = None  # delivery row's version
    state: str | None = None  # delivery row's state
    installed_at: float | None = None  # epoch seconds the current version was first installed
    waiting: bool = False  # installed but its participation conditions are not met
    silent_s: float = 0.0  # seconds since its delivery row last changed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultRecord:
    device_id: str
    duration_s: float
    metrics: Mapping[str, float]


def health(
    rel: rollouts.Subject,
    *,
    devices: Sequence[DeviceRecord],
    results: Sequence[ResultRecord],
    stage_started: Mapping[int, float],
) -> dict[str, Any]:
    """Per-stage health of the current version, cumulative over nested stages (`ReleaseStatus.health_json`).

    For each stage j up to the current one, over the devices stage j reaches
    (eligible): how many were notified / installed / succeeded / failed at the
    current version, how many report (a terminal state), success and error
    rates among those reporting, p95 of `results.duration_s`, the mean of each
    task metric over their results, coverage: seconds from the stage's start
    until 50/90/99 % of its eligible devices had installed, and `notReporting`:
    devices told about the current version that have said nothing since, for
    longer than the rollout's report deadline (`staging.Rollout.report_deadline`).
    """
    ro = rollouts.effective(rel)
    if ro is None:
        return {}
    out_stages = []
    on_stable = sum(1 for d in devices if d.version is not None and d.version != rel.version)
    deadline = ro.report_deadline
    for j in range(len(ro.stages)):
        members = [d for d in devices if d.stage is not None and d.stage <= j]
        ids = {d.device_id for d in members}
        at_version = [d for d in members if d.version == rel.version]
        states = [d.state for d in at_version]
        succeeded = states.count("succeeded")
        failed = states.count("failed") + states.count("refused")
        reporting = succeeded + failed
        mine = [r for r in results if r.device_id in ids]
        durations = sorted(r.duration_s for r in mine)
        names = sorted({k for r in mine for k in r.metrics})
        metrics = {
            k: sum(r.metrics[k] for r in mine if k in r.metrics) / sum(1 for r in mine if k in r.metrics) for k in names
        }
        installed_times = sorted(d.installed_at for d in at_version if d.installed_at is not None)
        start = stage_started.get(j)
        coverage: dict[str, float] = {}
        if start is not None and members:
            for q in COVERAGE_QUANTILES:
                k = math.ceil(q * len(members))
                if len(installed_times) >= k:
                    coverage[f"p{round(q * 100)}"] = round(max(0.0, installed_times[k - 1] - start), 3)
        out_stages.append(
            {
                "index": j,
                "eligible": len(members),
                "notified": sum(1 for s in states if s != "uninstalled"),
                "installed": sum(1 for s in states if s in ("installed", "running", "succeeded")),
                "succeeded": succeeded,
                "failed": failed,
                "reporting": reporting,
                "waiting": sum(1 for d in at_version if d.waiting and d.state in ("installed",)),
                "notReporting": sum(1 for d in at_version if d.state in SILENT_STATES and d.silent_s >= deadline),
                "results": len(mine),
                "successRate": None if reporting == 0 else succeeded / reporting,
                "errorRate": None if reporting == 0 else failed / reporting,
                "p95LatencySeconds": None if not durations else _quantile(durations, 0.95),
                "metrics": metrics,
                "coverageSeconds": coverage,
            }
        )
    return {
        "version": rel.version,
        "stage": ro.stage,
        "action": ro.action.value,
        "stableVersion": rel.stable.version if rel.stable is not None else 0,
        "onStable": on_stable,
        "reportDeadlineSeconds": deadline,
        "stages": out_stages,
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def conditions_met(conditions: Mapping[str, Any], state: Mapping[str, Any], *, release: str = "") -> bool:
    """Participation conditions (`trigger.conditions`) against a device's reported state.

    An agent that reports its waiting releases (`triggers.WAITING_KEY`, with its own policy for
    conditions it cannot tell) is taken at its word for `release`. For older agents, a condition
    the device does not report does not hold it back.
    """
    if release and triggers.WAITING_KEY in state:
        return release not in triggers.waiting_releases(str(state[triggers.WAITING_KEY]))
    for key in rollouts.CONDITION_KEYS:
        if conditions.get(key) and key in state and str(state[key]).lower() not in ("true", "1", "yes"):
            return False
    return True


def release_health(
    *,
    rels: Sequence[rollouts.Subject],
    fleet: Sequence[devices.Device],
    deliveries: Mapping[str, Mapping[str, DeliveryRow]],
    results: Mapping[str, Sequence[ResultRecord]],
    device_states: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """`health_json` of every staged release among `rels` (the others are left out).

    `deliveries`: release -> device id -> its delivery row; `results`: release -> the
    results at its current version; `device_states`: participation state per device.
    """
    out = {}
    for rel in rels:
        if rel.rollout is None:
            continue
        conditions = rel.spec.trigger.get("conditions") or {}
        mine = deliveries.get(rel.name, {})
        records = []
        for device in fleet:
            facts = device.facts
            if not rel.target.matches(facts):
                continue
            d = mine.get(device.device_id)
            records.append(
                DeviceRecord(
                    device_id=device.device_id,
                    stage=rollouts.stage_of(rel, facts),
                    version=None if d is None else d.version,
                    state=None if d is None else d.state,
                    installed_at=None if d is None else d.installed_at,
                    silent_s=0.0 if d is None else d.silent_s,
                    waiting=bool(conditions)
                    and not conditions_met(conditions, device_states.get(device.device_id, {}), release=rel.name),
                )
            )
        started = {
            j: datetime.datetime.fromisoformat(s.started_at).timestamp() for j, s in rel.rollout_state.stages.items()
        }
        doc = health(rel, devices=records, results=results.get(rel.name, []), stage_started=started)
        out[rel.name] = json.dumps(doc, sort_keys=True)
    return out


STATE_KEYS = (*rollouts.CONDITION_KEYS, "batteryLevel")


def check_device_state(state: Mapping[str, str]) -> dict[str, str]:
    """Only the known participation keys, with short values, and the waiting releases; anything else is dropped."""
    out = {k: str(v)[:16] for k, v in state.items() if k in STATE_KEYS}
    if triggers.WAITING_KEY in state:
        out[triggers.WAITING_KEY] = str(state[triggers.WAITING_KEY])[: triggers.MAX_WAITING_CHARS]
    return out
