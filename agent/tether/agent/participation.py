"""Participation conditions: run a task only while the device is charging / on an unmetered network / idle.

A release may say, in its trigger document, under which device conditions
it runs: `{"type": ..., "conditions": {"charging": true, "idle": true}}`
(MLTask `spec.trigger.conditions`). The agent checks them against the state
the device knows right before each run; a condition that is not met defers
the run (checked again every `RECHECK_S` seconds), it does not skip it.

Device state comes from a `StateProbe`: a callable answering
`{"charging": "true", "unmeteredNetwork": "false", "idle": "true"}` with only
the keys it can tell. A key the device cannot tell does not hold it back, as
the design says: conditions apply "where the device reports such state". The
agent also sends this state with every ReportStatus, so the controller can
count devices that have a version installed but wait for their conditions.

The default probe asks psutil for the battery's power plug when psutil is
installed; an app embedding the agent passes its own probe (it knows the
network type and whether the user is active).

Pure apart from `default_probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tether.spec import jsontext

KEYS = ("charging", "unmeteredNetwork", "idle")
RECHECK_S = 60.0

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
    return all(str(state[k]).lower() == "true" for k, required in conditions.items() if required and k in state)


def default_probe() -> dict[str, str]:
    """What this machine can tell about itself: the power plug, via psutil when it is installed."""
    try:
        import psutil  # optional on devices
    except ImportError:
        return {}
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, OSError, NotImplementedError):
        return {}
    if battery is None:  # no battery: a mains-powered device is always "charging"
        return {"charging": "true"}
    return {"charging": "true" if battery.power_plugged else "false"}
