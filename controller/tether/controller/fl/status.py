"""A federated release's rounds as status: the current round and the metric history (`ReleaseStatus.federated_json`).

    {"round": 3, "phase": "Collecting", "reason": "...", "selected": 10, "received": 4,
     "refused": {"NotSelected": 1}, "late": 0, "epsilon": 1.2, "delta": 1e-5,
     "history": [{"round": 1, "phase": "Published", "participants": 10, "updates": 10, "samples": 1200,
                  "metrics": {"loss": 0.4, "eval_accuracy": 0.8}, "evaluation": {"accuracy": 0.81, "loss": 0.6},
                  "evaluationError": "", "value": 0.81, "epsilon": 0.8, "model": "sha256:...", "version": 2}, ...],
     "metric": "accuracy", "evaluationError": ""}

`metrics` are the devices' (sample-weighted over the round's updates), `evaluation` the cloud's on the
held-out set (`evaluation.server`; null when the round was not scored), `value` the metric stopOn and the
status plot follow (`rounds.followed_metric`), and the top-level `evaluationError` the latest round's
evaluation failure recorded, if any.

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
            "evaluation": None if res is None or res.evaluation is None else dict(res.evaluation),
            "evaluationError": "" if res is None else res.evaluation_error,
            "value": None if rules is None else rounds.followed_metric(res, rules=rules),
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
        "metric": "" if rules is None or rules.evaluation is None else rules.evaluation.metric,
        "evaluationError": next((r["evaluationError"] for r in reversed(rows) if r["evaluationError"]), ""),
    }
    return doc
