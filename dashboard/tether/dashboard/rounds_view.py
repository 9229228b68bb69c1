"""The federated part of a task's page, read from the controller's round status (pure adapter).

The contract is the federated loop's (docs/internals.md "Federated rounds", `ReleaseStatus.federated_json`):
`{"round", "phase", "reason", "selected", "received", "refused": {reason: n}, "late", "epsilon", "delta",
"history": [{"round", "phase", "participants", "updates", "samples", "metrics", "epsilon",
"modelDigest", "version"}]}`; the MLTask status may carry `federated.round` and `federated.phase`.
This module is the one place that reads it: a controller without the field, or a task that is
not federated, gives None, and the page says "not a federated task". Values of the wrong type
are left out rather than shown wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRow:
    round: int
    phase: str
    participants: int | None
    updates: int | None
    samples: int | None
    metrics: Mapping[str, float]
    epsilon: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FederatedView:
    round: int | None
    phase: str
    reason: str
    selected: int | None
    received: int | None
    refused: Mapping[str, int]
    late: int | None
    epsilon: float | None
    delta: float | None
    history: tuple[RoundRow, ...]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(sorted({name for r in self.history for name in r.metrics}))

    def plot(self) -> dict[str, Any]:
        """uPlot's data: x = round number, one series per metric (None where a round lacks it)."""
        rounds = [r for r in self.history if r.metrics]
        names = self.metric_names
        return {
            "x": [r.round for r in rounds],
            "columns": [[r.metrics.get(n) for r in rounds] for n in names],
            "series": [{"label": n, "kind": "metric"} for n in names],
        }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _round(doc: Any) -> RoundRow | None:
    if not isinstance(doc, Mapping) or _int(doc.get("round")) is None:
        return None
    raw = doc.get("metrics")
    metrics: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    return RoundRow(
        round=int(doc["round"]),
        phase=str(doc.get("phase") or ""),
        participants=_int(doc.get("participants")),
        updates=_int(doc.get("updates")),
        samples=_int(doc.get("samples")),
        metrics={str(k): float(v) for k, v in metrics.items() if _float(v) is not None},
        epsilon=_float(doc.get("epsilon")),
    )


def view(release_federated: Mapping[str, Any] | None, task_status: Mapping[str, Any] | None) -> FederatedView | None:
    """The federated view of a task, or None when it is not federated (or nothing says so)."""
    doc = release_federated if isinstance(release_federated, Mapping) and release_federated else None
    mini = (task_status or {}).get("federated")
    mini = mini if isinstance(mini, Mapping) and mini else None
    if doc is None and mini is None:
        return None
    doc = doc or {}
    history = tuple(sorted((r for r in map(_round, doc.get("history") or []) if r), key=lambda r: r.round))
    raw = doc.get("refused")
    refused: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    return FederatedView(
        round=_int(doc.get("round")) if "round" in doc else _int((mini or {}).get("round")),
        phase=str(doc.get("phase") or (mini or {}).get("phase") or ""),
        reason=str(doc.get("reason") or ""),
        selected=_int(doc.get("selected")),
        received=_int(doc.get("received")),
        refused={str(k): int(v) for k, v in refused.items() if _int(v) is not None},
        late=_int(doc.get("late")),
        epsilon=_float(doc.get("epsilon")),
        delta=_float(doc.get("delta")),
        history=history,
    )
