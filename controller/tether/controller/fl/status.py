"""A federated release's rounds as status: the current round and the metric history (`ReleaseStatus.federated_json`).

    {"round": 3, "phase": "Collecting", "reason": "...", "selected": 10, "received": 4,
     "refused": {"NotSelected": 1}, "late": 0, "epsilon": 1.2, "delta": 1e-5,
     "history": [{"round": 1, "phase": "Published", "participants": 10, "updates": 10, "samples": 1200,
                  "metrics": {"loss": 0.4}, "epsilon": 0.8, "model": "sha256:...", "version": 2}, ...]}

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tether.controller.fl import rounds
from tether.spec import federation


def document(
    history: Sequence[rounds.Round],
    results: Mapping[int, rounds.RoundResult],
    *,
    rules: federation.Federation | None,
) -> dict[str, Any]:
    """The status document; {} before the first round."""
    if not history:
        return {}
    current = history[-1]
    rows: list[dict[str, Any]] = []
    epsilon: float | None = None
    for r in history:
        res = results.get(r.number)
        row: dict[str, Any] = {
            "round": r.number,
            "phase": r.phase.value,
            "participants": len(r.selected),
            "updates": len(r.received),
            "refused": r.refused,
            "samples": 0 if res is None else res.samples,
            "metrics": {} if res is None else dict(res.metrics),
            "epsilon": None if res is None else res.epsilon,
            "model": "" if res is None else res.model,
            "version": 0 if res is None else res.version,
        }
        if res is not None and res.epsilon is not None:
            epsilon = res.epsilon
        rows.append(row)
    doc: dict[str, Any] = {
        "round": current.number,
        "phase": current.phase.value,
        "reason": current.reason,
        "selected": len(current.selected),
        "received": len(current.received),
        "refused": dict(sorted(current.refusals.items())),
        "late": current.late,
        "epsilon": epsilon,
        "delta": rules.privacy.target_delta if rules is not None and rules.privacy is not None else None,
        "history": rows,
    }
    return doc
