"""What each page shows, computed from MLTask objects, release status documents and the device inventory.

Pure: no I/O. Every function takes plain documents (an MLTask as the Kubernetes API returns it,
`ReleaseStatus.health` as the controller sends it, `DeviceSummary` values) and returns frozen
values the templates render and the live updates carry. Nothing here reads a field that could
hold a secret: an MLTask's spec is shown only through the fields named below (never its bundle
URLs or annotations), and device labels are the facts devices report about themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from tether.common import errors
from tether.spec import selectors

MAX_HISTORY_POINTS = 2000  # samples kept per task for the coverage plot (a day at one every 45 s)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConditionRow:
    type: str
    status: str
    reason: str
    message: str
    since: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskRow:
    """One MLTask in the list: its phase, stage, counts and conditions."""

    namespace: str
    name: str
    phase: str
    stage: str
    version: int | None
    targeted: int
    installed: int
    succeeded: int
    failed: int
    paused: bool
    rollout_phase: str
    conditions: tuple[ConditionRow, ...]
    federated_round: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateRow:
    metric: str
    bound: str
    value: str
    state: str
    min: float | None
    max: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRow:
    index: int
    name: str
    phase: str
    current: bool
    eligible: int
    installed: int
    succeeded: int
    failed: int
    not_reporting: int
    success_rate: str
    p95: str
    coverage: str
    started_at: str | None
    gates: tuple[GateRow, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EventRow:
    time: str
    type: str
    reason: str
    message: str
    count: int


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _rate(value: Any) -> str:
    v = _float(value)
    return "-" if v is None else f"{100 * v:.1f}%"


def parse_time(text: Any) -> float | None:
    """An RFC 3339 timestamp as Unix seconds (None when absent or unreadable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def conditions(status: Mapping[str, Any]) -> tuple[ConditionRow, ...]:
    return tuple(
        ConditionRow(
            type=str(c.get("type", "")),
            status=str(c.get("status", "")),
            reason=str(c.get("reason", "")),
            message=str(c.get("message", "")),
            since=str(c.get("lastTransitionTime", "")),
        )
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    )


def task_row(obj: Mapping[str, Any]) -> TaskRow:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    rollout = status.get("rollout") or {}
    federated = status.get("federated") or {}
    return TaskRow(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        stage=str(status.get("stage") or "-"),
        version=_int(status["version"]) if status.get("version") is not None else None,
        targeted=_int(status.get("targeted")),
        installed=_int(status.get("installed")),
        succeeded=_int(status.get("succeeded")),
        failed=_int(status.get("failed")),
        paused=bool(spec.get("paused")),
        rollout_phase=str(rollout.get("phase") or ""),
        conditions=conditions(status),
        federated_round=_int(federated["round"]) if isinstance(federated, Mapping) and "round" in federated else None,
    )


def task_rows(objects: Iterable[Mapping[str, Any]]) -> list[TaskRow]:
    return sorted((task_row(o) for o in objects), key=lambda r: (r.namespace, r.name))


def _bound(gate: Mapping[str, Any]) -> str:
    parts = []
    if _float(gate.get("min")) is not None:
        parts.append(f"≥ {gate['min']:g}")
    if _float(gate.get("max")) is not None:
        parts.append(f"≤ {gate['max']:g}")
    return " and ".join(parts) or "-"


def stage_rows(status: Mapping[str, Any], health: Mapping[str, Any] | None) -> list[StageRow]:
    """Every stage: the operator's decisions (`status.rollout.stages`) over the controller's live counts."""
    rollout = status.get("rollout") or {}
    named: Sequence[Mapping[str, Any]] = rollout.get("stages") or []
    live: Sequence[Mapping[str, Any]] = (health or {}).get("stages") or []
    current = _int(rollout.get("currentStage", (health or {}).get("stage", 0)))
    frozen = rollout.get("phase") == "RolledBack"  # the operator kept the counts the version was judged on
    rows = []
    for i in range(max(len(named), len(live))):
        n = named[i] if i < len(named) else {}
        h = live[i] if i < len(live) and not frozen else {}

        def pick(key: str, h: Mapping[str, Any] = h, n: Mapping[str, Any] = n) -> Any:
            return h.get(key, n.get(key))

        coverage = pick("coverageSeconds") or {}
        gates = tuple(
            GateRow(
                metric=str(g.get("metric", "")),
                bound=_bound(g),
                value="-" if _float(g.get("value")) is None else f"{float(g['value']):.4g}",
                state=str(g.get("state", "")),
                min=_float(g.get("min")),
                max=_float(g.get("max")),
            )
            for g in n.get("gates") or []
            if isinstance(g, Mapping)
        )
        p95 = _float(pick("p95LatencySeconds"))
        rows.append(
            StageRow(
                index=i,
                name=str(n.get("name") or f"stage-{i + 1}"),
                phase=str(n.get("phase") or ("Current" if i == current else ("Done" if i < current else "Pending"))),
                current=i == current,
                eligible=_int(pick("eligible")),
                installed=_int(pick("installed")),
                succeeded=_int(pick("succeeded")),
                failed=_int(pick("failed")),
                not_reporting=_int(pick("notReporting")),
                success_rate=_rate(pick("successRate")),
                p95="-" if p95 is None else f"{p95:.2f} s",
                coverage=" ".join(f"{k} {v:g} s" for k, v in sorted(coverage.items()) if _float(v) is not None) or "-",
                started_at=n.get("startedAt"),
                gates=gates,
            )
        )
    return rows


def event_rows(events: Iterable[Mapping[str, Any]]) -> list[EventRow]:
    return [
        EventRow(
            time=str(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or ""),
            type=str(e.get("type", "")),
            reason=str(e.get("reason", "")),
            message=str(e.get("message", "")),
            count=_int(e.get("count") or 1),
        )
        for e in events
    ]


# ---------------------------------------------------------------- coverage over time


@dataclasses.dataclass(frozen=True)
class Sample:
    """Installed and succeeded per stage at one moment (Unix seconds), as the dashboard saw them."""

    at: float
    version: int
    installed: tuple[int, ...]
    succeeded: tuple[int, ...]


def sample(at: float, status: Mapping[str, Any], health: Mapping[str, Any] | None) -> Sample | None:
    rows = stage_rows(status, health)
    if not rows:
        return None
    version = _int((health or {}).get("version", (status.get("rollout") or {}).get("version")))
    return Sample(
        at=at, version=version, installed=tuple(r.installed for r in rows), succeeded=tuple(r.succeeded for r in rows)
    )


def extend(history: Sequence[Sample], new: Sample | None) -> tuple[Sample, ...]:
    """The history with `new` appended: a new version starts over, an unchanged sample is not repeated."""
    if new is None:
        return tuple(history)
    kept = [s for s in history if s.version == new.version]

    def same(s: Sample) -> bool:
        return s.installed == new.installed and s.succeeded == new.succeeded

    if len(kept) >= 2 and same(kept[-1]) and same(kept[-2]):
        kept[-1] = new  # nothing moved: keep the first and the latest time of the plateau only
        return tuple(kept[-MAX_HISTORY_POINTS:])
    kept.append(new)
    return tuple(kept[-MAX_HISTORY_POINTS:])


def coverage_plot(
    status: Mapping[str, Any], health: Mapping[str, Any] | None, history: Sequence[Sample]
) -> dict[str, Any]:
    """uPlot's data for the coverage plot: x (Unix seconds), then installed and succeeded per stage.

    Points come from the dashboard's own samples, and, for the time before it watched, from the
    controller's coverage percentiles (seconds from a stage's start until 50/90/99 % of its eligible
    devices installed). Device-count gates (`devicesReporting`, `notReporting`) are drawn as lines.
    """
    rows = stage_rows(status, health)
    staged = bool((status.get("rollout") or {}).get("stages"))
    starts: dict[int, float | None] = {r.index: parse_time(r.started_at) for r in rows}
    anchors: dict[float, dict[int, int]] = {}
    for row in rows:
        start = starts[row.index]
        if start is None:
            continue
        # The percentiles tell the time before the dashboard watched; its own samples are exact after that.
        seen = [s.at for s in history if s.at >= start]
        points = [(start, 0)]
        doc = _coverage_doc(status, health, row.index)
        for key, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            seconds = _float(doc.get(key))
            if seconds is not None:
                points.append((start + seconds, round(fraction * row.eligible)))
        for at, value in points:
            if not seen or at < min(seen):
                anchors.setdefault(at, {})[row.index] = value
    xs = sorted({*anchors, *(s.at for s in history)})
    by_time = {s.at: s for s in history}
    series: list[dict[str, Any]] = []
    columns: list[list[float | None]] = []
    for row in rows:
        start = starts[row.index]
        installed: list[float | None] = []
        succeeded: list[float | None] = []
        for x in xs:
            s = by_time.get(x)
            # a stage that has not begun (or had not, at x) has no coverage to draw
            begun = (start is not None and x >= start) or (start is None and not staged)
            if s is not None and row.index < len(s.installed) and begun:
                installed.append(s.installed[row.index])
                succeeded.append(s.succeeded[row.index])
            else:
                installed.append(anchors.get(x, {}).get(row.index))
                succeeded.append(None)
        columns += [installed, succeeded]
        series += [
            {"label": f"{row.name} installed", "stage": row.index, "kind": "installed"},
            {"label": f"{row.name} succeeded", "stage": row.index, "kind": "succeeded"},
        ]
    for row in rows:
        for g in row.gates:
            bound = g.min if g.min is not None else g.max
            if g.metric in ("devicesReporting", "notReporting") and bound is not None:
                columns.append([bound for _ in xs])
                series.append({"label": f"{row.name}: {g.metric} {g.bound}", "stage": None, "kind": "threshold"})
    return {"x": xs, "columns": columns, "series": series}


def _coverage_doc(status: Mapping[str, Any], health: Mapping[str, Any] | None, index: int) -> Mapping[str, Any]:
    live = (health or {}).get("stages") or []
    named = (status.get("rollout") or {}).get("stages") or []
    for docs in (live, named):
        if index < len(docs) and isinstance(docs[index], Mapping):
            cov = docs[index].get("coverageSeconds")
            if isinstance(cov, Mapping) and cov:
                return cov
    return {}


# ---------------------------------------------------------------- the fleet


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRow:
    device_id: str
    labels: tuple[tuple[str, str], ...]
    versions: tuple[str, ...]  # "release v3 installed"
    last_seen: str
    selected_backend: str
    connected_replica: str
    revoked: bool


def facts(device: Any) -> selectors.Facts:
    """A device's facts as targets see them (its labels, backends, selected backends, id)."""
    out: dict[str, frozenset[str]] = {str(k): frozenset({str(v)}) for k, v in dict(device.labels).items()}
    out[selectors.BACKEND_KEY] = frozenset(str(b) for b in device.backends)
    chosen = {str(s).split("=", 1)[-1].rsplit("/", 2)[0] for s in device.selected_backends}
    out[selectors.SELECTED_BACKEND_KEY] = frozenset(chosen)
    out[selectors.DEVICE_ID_KEY] = frozenset({str(device.device_id)})
    return out


def parse_filter(text: str) -> selectors.Target:
    """The fleet filter: a target document in the CRD's grammar, as YAML or JSON (`errors.InvalidSpec`)."""
    if not text.strip():
        return selectors.Target()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.InvalidSpec(f"filter: not YAML or JSON: {errors.excerpt(str(e))}") from None
    return selectors.parse_target(doc, field="filter", keyed=selectors.dotted)


def _when(unix: float | None, now: float) -> str:
    if not unix:
        return "never"
    ago = max(0.0, now - unix)
    if ago < 90:
        return f"{ago:.0f} s ago"
    if ago < 5400:
        return f"{ago / 60:.0f} min ago"
    if ago < 172800:
        return f"{ago / 3600:.0f} h ago"
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def device_rows(devices: Iterable[Any], *, target: selectors.Target, now: float) -> list[DeviceRow]:
    return [
        DeviceRow(
            device_id=str(d.device_id),
            labels=tuple(sorted((str(k), str(v)) for k, v in dict(d.labels).items())),
            versions=tuple(f"{r} v{v} {s}" for r, v, s in d.releases),
            last_seen=_when(d.last_seen_unix, now),
            selected_backend=", ".join(str(s) for s in d.selected_backends) or "-",
            connected_replica=str(d.connected_replica or "") or "not connected",
            revoked=bool(d.revoked),
        )
        for d in devices
        if target.matches(facts(d))
    ]


# ---------------------------------------------------------------- the aggregate


def aggregate_table(aggregate: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A task's latest aggregate flattened to (key, value) rows: nested keys dotted, lists shortened."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            shown = " ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:32])
            rows.append((prefix, shown + (f" … ({len(value)} values)" if len(value) > 32 else "")))
        else:
            rows.append((prefix, str(value)))

    walk("", aggregate or {})
    return rows
