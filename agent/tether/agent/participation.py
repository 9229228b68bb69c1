"""Participation conditions: run a task only while the device is charging / on an unmetered network / idle.

A release may say, in its trigger document, under which device conditions
it runs: `{"type": ..., "conditions": {"charging": true, "idle": true}}`
(MLTask `spec.trigger.conditions`). The agent checks them against the state
the device knows right before each run; a condition that is not met defers
the run (checked again every `RECHECK_S` seconds), it does not skip it.

Device state is a mapping `{"charging": "true", "unmeteredNetwork": "false",
"idle": "unknown"}`: each key `"true"`, `"false"` or `"unknown"` (a key that
is absent is unknown). It comes from `tether.agent.devicestate` (Linux probes,
overridden for a bounded time by what the host app reports on the events
socket). A required condition whose state is unknown holds the run back by
default (`UNKNOWN_POLICIES`: `tether agent run --conditions-unknown wait`);
`run` lets it through, as agents before this did. `waiting_reason` says why a
release waits ("not charging; idle unknown"); the agent sends its waiting
releases with its device state (`WAITING_KEY`), so `tether device list` and
the rollout's `waiting` count show who waits and why.

Pure: the probes live in `tether.agent.devicestate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tether.spec import jsontext, triggers

KEYS = ("charging", "unmeteredNetwork", "idle")
WAITING_KEY = triggers.WAITING_KEY  # "<release>: <reason> | <release>: <reason>" (triggers.waiting_summary)
BATTERY_KEY = "batteryLevel"  # percent, informational (no condition asks for it)
REPORTED_KEYS = (*KEYS, WAITING_KEY, BATTERY_KEY)
UNKNOWN = "unknown"
UNKNOWN_POLICIES = ("wait", "run")
RECHECK_S = 60.0
_NOT_MET = {"charging": "not charging", "unmeteredNetwork": "on a metered network", "idle": "not idle"}

StateProbe = Callable[[], Mapping[str, str]]


def conditions_of(trigger_json: str) -> dict[str, bool]:
    """The participation conditions a trigger document asks for (only the true ones)."""
    if not trigger_json.strip():
        return {}
    try:
        doc: Any = jsontext.loads(trigger_json)
    except ValueError:
        return {}  # a malformed trigger is refused by the trigger parser, not here
    raw = doc.get("conditions") if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {k: True for k in KEYS if raw.get(k) is True}


def met(conditions: Mapping[str, bool], state: Mapping[str, str]) -> bool:
    """Whether every required condition holds (one the device cannot tell counts as holding)."""
    return not waiting_reason(conditions, state, unknown="run")


def waiting_reason(conditions: Mapping[str, bool], state: Mapping[str, str], *, unknown: str = "wait") -> str:
    """ "" when the run may go; else why not, e.g. "not charging; idle unknown" (`unknown`: "wait" or "run")."""
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown: {unknown!r} not in {UNKNOWN_POLICIES}")
    reasons = []
    for key in KEYS:
        if not conditions.get(key):
            continue
        value = str(state.get(key, UNKNOWN)).lower()
        if value == "false":
            reasons.append(_NOT_MET[key])
        elif value != "true" and unknown == "wait":
            reasons.append(f"{key} unknown")
    return "; ".join(reasons)
