"""MLTask triggers: every type agents run, validated at apply time with the agents' parser, sent in their format."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tether.common import errors
from tether.operator import reconcile, task_status, validate
from tether.spec import triggers

DIGEST = "sha256:" + "0" * 64
META = reconcile.Meta(name="digits", namespace="ml", generation=1)
T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
ROOT = pathlib.Path(__file__).resolve().parents[2]

PATTERN = {
    "steps": [
        {"type": "page_view", "page": "item"},
        {"type": "add_to_cart", "where": {"price": {"gte": 10}, "cat": {"in": ["shoes", "bags"]}, "promo": True}},
    ],
    "within": 30,
}
WINDOW = {"seconds": 3600, "types": ["page_view", "purchase"]}
AGGREGATE = [{"name": "dwell", "by": "page", "value": "dwell_ms", "ops": ["count", "mean"]}]

# (MLTask spec.trigger, the trigger_json document agents get)
VALID = [
    pytest.param({}, {"type": "onInstall"}, id="default"),
    pytest.param({"type": "onInstall"}, {"type": "onInstall"}, id="onInstall"),
    pytest.param({"type": "interval", "intervalSeconds": 600}, {"type": "interval", "seconds": 600}, id="interval"),
    pytest.param({"type": "cron", "schedule": "0 3 * * *"}, {"type": "cron", "schedule": "0 3 * * *"}, id="cron-utc"),
    pytest.param(
        {"type": "cron", "schedule": "*/15 9-17 * * mon-fri", "timezone": "Europe/Berlin"},
        {"type": "cron", "schedule": "*/15 9-17 * * mon-fri", "timezone": "Europe/Berlin"},
        id="cron-zone",
    ),
    pytest.param({"type": "cron", "schedule": "@hourly"}, {"type": "cron", "schedule": "@hourly"}, id="cron-macro"),
    pytest.param({"type": "onDemand"}, {"type": "onDemand"}, id="onDemand"),
    pytest.param(
        {"type": "pattern", "pattern": PATTERN, "cooldownSeconds": 60},
        {"type": "pattern", "pattern": {**PATTERN, "within": 30.0}, "cooldownSeconds": 60.0},
        id="pattern",
    ),
    pytest.param(
        {"type": "pattern", "pattern": {"steps": [{"type": "purchase"}]}},
        {"type": "pattern", "pattern": {"steps": [{"type": "purchase"}]}},
        id="pattern-minimal",
    ),
    pytest.param(
        {
            "type": "cron",
            "schedule": "0 * * * *",
            "window": WINDOW,
            "aggregate": AGGREGATE,
            "conditions": {"charging": True, "idle": False},
        },
        {
            "type": "cron",
            "schedule": "0 * * * *",
            "window": {"seconds": 3600.0, "types": ["page_view", "purchase"]},
            "aggregate": AGGREGATE,
            "conditions": {"charging": True},
        },
        id="cron-window-aggregate-conditions",
    ),
    pytest.param(
        {"type": "onDemand", "window": {"count": 100}, "aggregate": [{"by": "type"}]},
        {"type": "onDemand", "window": {"count": 100}, "aggregate": [{"by": "type"}]},
        id="onDemand-count-window",
    ),
]


def spec(trigger: dict[str, Any]) -> dict[str, Any]:
    return {"bundle": {"digest": DIGEST}, "trigger": trigger}


def trigger_json(trigger: dict[str, Any]) -> str:
    """What the operator sends the controller for this MLTask trigger (ApplyRelease.trigger_json)."""
    d = reconcile.decide(spec=spec(trigger), meta=META, status=task_status.MLTaskStatus(), observed=None, now=T0)
    (action,) = [a for a in d.actions if isinstance(a, reconcile.ApplyRelease)]
    return action.trigger_json


@pytest.mark.parametrize(("trigger", "document"), VALID)
def test_every_trigger_type_validates_and_travels_in_the_agents_format(trigger, document) -> None:
    typed = validate.validate(spec(trigger))
    assert typed.trigger.agent_document() == document
    assert json.loads(trigger_json(trigger)) == document


@pytest.mark.parametrize(("trigger", "document"), VALID)
def test_the_agent_accepts_what_the_operator_sends(trigger, document) -> None:
    parsed = triggers.Trigger.from_json(trigger_json(trigger))
    assert parsed.type == document["type"]
    if parsed.type == "interval":
        assert parsed.interval_s == document["seconds"]
    if parsed.type == "cron":
        assert parsed.cron is not None and parsed.cron.expression == document["schedule"]
        assert parsed.cron.timezone == document.get("timezone", "UTC")
    if parsed.type == "pattern":
        assert parsed.stream is not None and parsed.stream.pattern is not None
        assert [s.type for s in parsed.stream.pattern.steps] == [s["type"] for s in document["pattern"]["steps"]]
    if "window" in document:
        assert parsed.stream is not None and parsed.stream.window is not None
        assert len(parsed.stream.aggregates) == len(document.get("aggregate", []))


def test_a_cron_trigger_reaches_the_controller_as_trigger_json() -> None:
    sent = trigger_json({"type": "cron", "schedule": "0 3 * * *", "timezone": "Europe/Berlin"})
    assert sent == '{"schedule":"0 3 * * *","timezone":"Europe/Berlin","type":"cron"}'
    hourly = triggers.Trigger.from_json(sent)
    assert hourly.scheduled and hourly.next_due(last_run=None, armed_at=0.0) is not None


@pytest.mark.parametrize(
    ("trigger", "field", "words"),
    [
        # fields that belong to one type
        ({"type": "cron"}, "spec.trigger.schedule", "is required when trigger.type is cron"),
        ({"type": "pattern"}, "spec.trigger.pattern", "is required when trigger.type is pattern"),
        ({"type": "interval"}, "spec.trigger.intervalSeconds", "is required when trigger.type is interval"),
        ({"type": "interval", "intervalSeconds": 60, "schedule": "* * * * *"}, "spec.trigger.schedule", "only"),
        ({"type": "onInstall", "timezone": "UTC"}, "spec.trigger.timezone", "only allowed when trigger.type is cron"),
        ({"type": "cron", "schedule": "@daily", "cooldownSeconds": 5}, "spec.trigger.cooldownSeconds", "only"),
        ({"type": "onDemand", "pattern": PATTERN}, "spec.trigger.pattern", "only allowed when trigger.type is"),
        # bad cron: the agents' parser, the field named
        ({"type": "cron", "schedule": "61 * * * *"}, "spec.trigger.schedule", "minute: 61 is outside [0, 59]"),
        ({"type": "cron", "schedule": "* * *"}, "spec.trigger.schedule", "has 3 fields"),
        ({"type": "cron", "schedule": "0 0 31 2 *"}, "spec.trigger.schedule", "never fires"),
        ({"type": "cron", "schedule": "0 0 * * funday"}, "spec.trigger.schedule", "day-of-week"),
        ({"type": "cron", "schedule": "@daily", "timezone": "Mars/Olympus"}, "spec.trigger.timezone", "time zone"),
        ({"type": "cron", "schedule": ""}, "spec.trigger.schedule", "at least 1 character"),
        # bad pattern
        ({"type": "pattern", "pattern": {"steps": []}}, "spec.trigger.pattern.steps", "at least 1 item"),
        ({"type": "pattern", "pattern": {"steps": [{"page": "item"}]}}, "spec.trigger.pattern.steps[0].type", ""),
        (
            {"type": "pattern", "pattern": {"steps": [{"type": "a", "where": {"price": {"approx": 3}}}]}},
            "spec.trigger.pattern.steps[0].where.price",
            "operator 'approx' is not one of",
        ),
        (
            {"type": "pattern", "pattern": {"steps": [{"type": "a"}, {"type": "b", "where": {"n": {"gt": "x"}}}]}},
            "spec.trigger.pattern.steps[1].where.n",
            "gt takes a finite number",
        ),
        (
            {"type": "pattern", "pattern": {"steps": [{"type": "a", "where": {"c": {"in": "shoes"}}}]}},
            "spec.trigger.pattern.steps[0].where.c",
            "in takes a list",
        ),
        ({"type": "pattern", "pattern": {"steps": [{"type": "a"}], "within": -1}}, "spec.trigger.pattern.within", ""),
        ({"type": "pattern", "pattern": {"steps": [{"type": "a"}], "every": 3}}, "spec.trigger.pattern.every", ""),
        # windows and aggregations
        ({"aggregate": AGGREGATE}, "spec.trigger.aggregate", "aggregations need a window"),
        ({"window": {}}, "spec.trigger.window", "needs seconds, count or both"),
        ({"window": {"count": 0}}, "spec.trigger.window.count", "at least 1"),
        ({"window": WINDOW, "aggregate": [{"by": "page", "ops": ["sum"]}]}, "spec.trigger.aggregate[0].value", ""),
        ({"window": WINDOW, "aggregate": [{"by": "page", "ops": ["median"]}]}, "spec.trigger.aggregate[0].ops[0]", ""),
        ({"window": WINDOW, "aggregate": [{"by": "a"}, {"by": "a"}]}, "spec.trigger.aggregate", "must be unique"),
    ],
)
def test_bad_triggers_are_refused_at_apply_time_naming_the_field(trigger, field, words) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        validate.validate(spec(trigger))
    assert field in [i.field for i in info.value.issues], info.value.issues
    assert words in str(info.value)


def test_an_invalid_trigger_never_reaches_the_controller() -> None:
    d = reconcile.decide(
        spec=spec({"type": "cron", "schedule": "0 25 * * *"}),
        meta=META,
        status=task_status.MLTaskStatus(),
        observed=None,
        now=T0,
    )
    assert not [a for a in d.actions if isinstance(a, reconcile.ApplyRelease)]
    valid = d.status.condition("Valid")
    assert valid is not None and valid.status == task_status.ConditionStatus.FALSE
    assert "spec.trigger.schedule" in valid.message and "hour: 25" in valid.message


def test_the_example_triggers_are_the_real_ones_and_agents_accept_them() -> None:
    sent = {}
    for name in ("shop-stats", "digits-train"):
        doc = yaml.safe_load((ROOT / "examples" / name / "mltask.yaml").read_text(encoding="utf-8"))
        trigger = doc["spec"]["trigger"]
        sent[name] = triggers.Trigger.from_json(trigger_json(trigger))
    shop = sent["shop-stats"]
    assert shop.type == "cron" and shop.cron is not None and shop.cron.expression == "0 * * * *"
    assert shop.stream is not None and shop.stream.window is not None and shop.stream.window.seconds == 3600
    assert [a.name for a in shop.stream.aggregates] == ["dwell"]
    train = sent["digits-train"]
    assert train.type == "cron" and train.cron is not None and train.cron.expression == "0 3 * * *"


def test_neither_the_operator_nor_the_controller_imports_the_agent() -> None:
    code = (
        "import sys, tether.operator.validate, tether.operator.reconcile, tether.operator.crd, "
        "tether.controller.releases; "
        "print(sorted(m for m in sys.modules if m.startswith('tether.agent')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
