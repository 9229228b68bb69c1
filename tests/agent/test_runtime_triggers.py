"""Triggers: cron parsing and timing, trigger documents, the dispatcher (no sleeping: clocks are injected)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tether.agent import schedule
from tether.agent.stream import processor
from tether.agent.stream.eventstore import EventStore
from tether.common import errors
from tether.spec import cron, triggers


def ts(*args: int, tz: str = "UTC") -> float:
    import zoneinfo

    return dt.datetime(*args, tzinfo=zoneinfo.ZoneInfo(tz)).timestamp()


def fires(expr: str, start: float, n: int = 3, tz: str = "UTC") -> list[str]:
    s = cron.CronSchedule.parse(expr, timezone=tz)
    out, t = [], start
    for _ in range(n):
        t = s.next_after(t)
        out.append(dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M %a"))
    return out


SAT_NOON = ts(2026, 11, 21, 12, 0)  # a Saturday


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("*/15 * * * *", ["2026-11-21 12:15 Sat", "2026-11-21 12:30 Sat", "2026-11-21 12:45 Sat"]),
        ("0 9-17/4 * * mon-fri", ["2026-11-23 09:00 Mon", "2026-11-23 13:00 Mon", "2026-11-23 17:00 Mon"]),
        ("30 2 1,15 * *", ["2026-12-01 02:30 Tue", "2026-12-15 02:30 Tue", "2027-01-01 02:30 Fri"]),
        ("0 0 29 2 *", ["2028-02-29 00:00 Tue", "2032-02-29 00:00 Sun", "2036-02-29 00:00 Fri"]),
        ("0 12 13 * 5", ["2026-11-27 12:00 Fri", "2026-12-04 12:00 Fri", "2026-12-11 12:00 Fri"]),  # dom OR dow
        ("0 0 * * 7", ["2026-11-22 00:00 Sun", "2026-11-29 00:00 Sun", "2026-12-06 00:00 Sun"]),
        ("@hourly", ["2026-11-21 13:00 Sat", "2026-11-21 14:00 Sat", "2026-11-21 15:00 Sat"]),
        ("5/20 0 * jan,jul *", ["2027-01-01 00:05 Fri", "2027-01-01 00:25 Fri", "2027-01-01 00:45 Fri"]),
    ],
)
def test_cron_next_firings(expr, expected) -> None:
    assert fires(expr, SAT_NOON) == expected


def test_cron_fires_strictly_after_and_at_minute_boundaries() -> None:
    s = cron.CronSchedule.parse("0 * * * *")
    assert s.next_after(ts(2026, 1, 1, 10, 0)) == ts(2026, 1, 1, 11, 0)
    assert s.next_after(ts(2026, 1, 1, 10, 0) - 0.5) == ts(2026, 1, 1, 10, 0)


def test_cron_in_a_time_zone_skips_a_wall_time_that_does_not_exist() -> None:
    # 02:30 does not exist in Berlin on 2026-03-29 (clocks jump from 02:00 to 03:00).
    got = fires("30 2 * * *", ts(2026, 3, 28, 12, 0), n=2, tz="Europe/Berlin")
    assert got == ["2026-03-30 00:30 Mon", "2026-03-31 00:30 Tue"]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "has 4 fields"),
        ("60 * * * *", "minute: 60 is outside"),
        ("* * 0 * *", "day-of-month: 0 is outside"),
        ("*/0 * * * *", "step '0'"),
        ("5-1 * * * *", "runs backwards"),
        ("* * * foo *", "month: 'foo' is not a number"),
        ("0 0 30 2 *", "never fires"),
        ("1,,2 * * * *", "empty list item"),
        ("", "non-empty"),
    ],
)
def test_bad_cron_expressions(expr, message) -> None:
    with pytest.raises(cron.InvalidCron, match=message):
        cron.CronSchedule.parse(expr)


def test_unknown_time_zone() -> None:
    with pytest.raises(cron.InvalidCron, match="unknown time zone"):
        cron.CronSchedule.parse("* * * * *", timezone="Mars/Olympus")


# ---------------------------------------------------------------- trigger documents


def test_every_trigger_type_parses() -> None:
    T = triggers.Trigger
    assert T.from_json("") == T() and T.from_json('{"type": "onInstall"}') == T()
    assert T.from_json('{"type": "interval", "seconds": 30}') == T("interval", 30.0)
    c = T.from_json('{"type": "cron", "schedule": "*/5 * * * *", "timezone": "Europe/Paris"}')
    assert c.type == "cron" and c.cron is not None and c.cron.timezone == "Europe/Paris"
    assert T.from_json('{"type": "onDemand"}').type == "onDemand"
    p = T.from_json(
        json.dumps(
            {
                "type": "pattern",
                "pattern": {"steps": [{"type": "page_view"}, {"type": "add_to_cart"}], "within": 30},
                "cooldownSeconds": 60,
                "window": {"count": 50},
            }
        )
    )
    assert p.stream is not None and p.stream.pattern is not None and p.stream.cooldown_s == 60
    w = T.from_json('{"type": "interval", "seconds": 60, "window": {"seconds": 60}}')
    assert w.stream is not None and w.stream.pattern is None and w.stream.window is not None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"type": "lunar"}, "trigger: type 'lunar' is not supported"),
        ({"type": "cron"}, "trigger.schedule"),
        ({"type": "cron", "schedule": "* * *"}, "has 3 fields"),
        ({"type": "pattern"}, "trigger.pattern: must be an object"),
        ({"type": "pattern", "pattern": {"steps": [{"type": "a"}]}, "cooldownSeconds": -1}, "cooldownSeconds"),
        ({"type": "interval", "seconds": 30, "schedule": "* * * * *"}, "unknown keys"),
        ({"type": "onInstall", "aggregate": {"by": "page"}}, "aggregations need a window"),
    ],
)
def test_triggers_this_agent_cannot_honour_are_refused(doc, message) -> None:
    with pytest.raises(errors.InvalidSpec, match=message):
        triggers.Trigger.from_json(json.dumps(doc))


def test_next_due() -> None:
    interval = triggers.Trigger("interval", 60.0)
    assert interval.next_due(last_run=None, armed_at=100.0) == 100.0
    assert interval.next_due(last_run=1000.0, armed_at=100.0) == 1060.0
    hourly = triggers.Trigger.from_json('{"type": "cron", "schedule": "0 * * * *"}')
    armed = ts(2026, 1, 1, 10, 20)
    assert hourly.next_due(last_run=None, armed_at=armed) == ts(2026, 1, 1, 11, 0)  # not right away
    assert hourly.next_due(last_run=ts(2026, 1, 1, 11, 0, 1), armed_at=armed) == ts(2026, 1, 1, 12, 0)
    assert triggers.Trigger().next_due(last_run=None, armed_at=armed) is None


# ---------------------------------------------------------------- the dispatcher


def test_dispatcher_queues_pattern_fires_and_dedups_on_demand_requests(tmp_path) -> None:
    now = [1_700_000_000.0]
    kicked: list[str] = []
    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db", clock=lambda: now[0]), clock=lambda: now[0])
    d = schedule.Dispatcher(proc, clock=lambda: now[0], kick=kicked.append)
    pattern = triggers.Trigger.from_json(
        json.dumps({"type": "pattern", "pattern": {"steps": [{"type": "buy"}]}, "window": {"seconds": 10}})
    )
    d.arm("ns/a", 1, pattern)
    assert d.arm("ns/a", 1, pattern) == now[0]  # idempotent
    proc.ingest([{"type": "view", "ts": now[0] - 1}, {"type": "buy", "ts": now[0]}])
    assert d.on_demand(release="ns/a", version=1, request_id="r1", payload_json='{"epochs": 2}') is None
    assert d.on_demand(release="ns/a", version=1, request_id="r1", payload_json="{}") is None  # a repeat
    assert "not valid JSON" in d.on_demand(release="ns/a", version=1, request_id="r2", payload_json="{")
    assert d.on_demand(release="ns/a", version=7, request_id="old", payload_json="") is None
    assert kicked == ["ns/a", "ns/a", "ns/a"]
    runs = d.take("ns/a", 1)
    assert [(r.trigger, r.request_id) for r in runs] == [("pattern", ""), ("onDemand", "r1")]
    assert [e["type"] for e in runs[0].inputs["events"]] == ["view", "buy"]
    assert runs[0].inputs["match"]["events"][0]["type"] == "buy"
    assert runs[1].inputs["payload"] == {"epochs": 2}
    assert d.take("ns/a", 1) == []
    d.disarm("ns/a")
    assert proc.registered() == [] and d.armed_at("ns/a") is None


def test_dispatcher_hands_out_runs_one_at_a_time_and_drops_other_versions(tmp_path) -> None:
    proc = processor.StreamProcessor(EventStore(tmp_path / "e.db"))
    d = schedule.Dispatcher(proc, clock=lambda: 1_700_000_000.0, kick=lambda release: None)
    d.arm("ns/a", 2, triggers.Trigger.from_json('{"type": "onDemand"}'))
    for request_id, version in (("old", 1), ("r1", 2), ("any", 0)):
        d.on_demand(release="ns/a", version=version, request_id=request_id, payload_json="")
    assert d.next("ns/a", 2).request_id == "r1"
    assert d.next("ns/a", 2).request_id == "any"
    assert d.next("ns/a", 2) is None
