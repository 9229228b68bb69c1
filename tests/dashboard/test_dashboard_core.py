"""The dashboard's pure parts and its fan-out: views, the federated adapter, sessions, one poll per subject."""

from __future__ import annotations

import asyncio
import json

import pytest
from dashboard_support import HEALTH, TOKEN, mltask

from tether.common import errors
from tether.dashboard import livehub, rounds_view, sessions, views

# A status document as fl-loop's contract writes it (docs/internals.md "Federated rounds"), recorded.
FEDERATED = {
    "round": 3,
    "phase": "Collecting",
    "selected": 12,
    "received": 7,
    "refused": {"Duplicate": 1, "NotSelected": 2},
    "late": 1,
    "epsilon": 1.25,
    "delta": 1e-5,
    "history": [
        {
            "round": 2,
            "phase": "Published",
            "participants": 10,
            "updates": 10,
            "samples": 640,
            "metrics": {"accuracy": 0.81, "loss": 0.52},
            "epsilon": 0.9,
            "modelDigest": "sha256:bb",
            "version": 4,
        },
        {
            "round": 1,
            "phase": "Published",
            "participants": 10,
            "updates": 9,
            "samples": 600,
            "metrics": {"accuracy": 0.72},
            "epsilon": 0.6,
            "modelDigest": "sha256:aa",
            "version": 3,
        },
        {"round": "x", "phase": "junk"},
    ],
}


def test_federated_adapter_reads_the_contract_and_skips_wrong_values() -> None:
    fl = rounds_view.view(FEDERATED, {"federated": {"round": 3, "phase": "Collecting"}})
    assert fl is not None
    assert (fl.round, fl.phase, fl.selected, fl.received, fl.late) == (3, "Collecting", 12, 7, 1)
    assert fl.epsilon == 1.25 and fl.refused == {"Duplicate": 1, "NotSelected": 2}
    assert [r.round for r in fl.history] == [1, 2]
    assert fl.metric_names == ("accuracy", "loss")
    plot = fl.plot()
    assert plot["x"] == [1, 2] and plot["columns"] == [[0.72, 0.81], [None, 0.52]]


def test_federated_adapter_reads_what_the_controller_writes() -> None:
    """The controller's own status document (tether.controller.fl.status), not a copy of its shape."""
    from tether.controller.fl import rounds, status

    published = rounds.Round(
        task="ml/fl", number=1, phase=rounds.Phase.PUBLISHED, deadline=0.0, selected=("a", "b"), received=("a", "b")
    )
    current = rounds.Round(
        task="ml/fl",
        number=2,
        phase=rounds.Phase.COLLECTING,
        deadline=0.0,
        selected=("a", "b", "c"),
        received=("a",),
        reason="waiting for updates",
        refusals={"Duplicate": 1},
    )
    result = rounds.RoundResult(model="sha256:m1", samples=64, metrics={"accuracy": 0.7}, epsilon=0.5, version=2)
    doc = status.document([published, current], {1: result}, rules=None)
    fl = rounds_view.view(json.loads(json.dumps(doc)), {"federated": {"round": 2, "phase": "Collecting"}})
    assert fl is not None
    assert (fl.round, fl.phase, fl.reason, fl.selected, fl.received) == (2, "Collecting", "waiting for updates", 3, 1)
    assert fl.refused == {"Duplicate": 1} and fl.epsilon == 0.5
    assert [(r.round, r.participants, r.updates, r.samples) for r in fl.history] == [(1, 2, 2, 64), (2, 3, 1, 0)]
    assert fl.plot() == {"x": [1], "columns": [[0.7]], "series": [{"label": "accuracy", "kind": "metric"}]}


def test_a_task_without_round_status_is_not_federated() -> None:
    assert rounds_view.view(None, {}) is None
    assert rounds_view.view({}, {"phase": "Progressing"}) is None
    only_status = rounds_view.view(None, {"federated": {"round": 2, "phase": "Open"}})
    assert only_status is not None and only_status.round == 2 and only_status.history == ()


def test_stage_rows_merge_the_operator_decisions_with_live_counts() -> None:
    status = mltask()["status"]
    rows = views.stage_rows(status, HEALTH)
    assert [(r.name, r.current, r.eligible, r.installed, r.succeeded) for r in rows] == [
        ("beta", False, 10, 10, 9),
        ("gray", True, 50, 20, 15),
    ]
    assert rows[1].gates[0].bound == "≥ 5" and rows[1].gates[1].value == "1"
    rolled_back = {**status, "rollout": {**status["rollout"], "phase": "RolledBack"}}
    assert views.stage_rows(rolled_back, HEALTH)[1].installed == 0  # the operator's frozen counts, not live ones


def test_coverage_plot_uses_percentile_anchors_and_samples_per_version() -> None:
    status = mltask()["status"]
    history = views.extend((), views.sample(1_767_230_000.0, status, HEALTH))
    plot = views.coverage_plot(status, HEALTH, history)
    start = views.parse_time("2026-01-01T00:00:00Z")
    assert start is not None and start in plot["x"] and start + 4.0 in plot["x"] and start + 9.0 in plot["x"]
    beta_installed = plot["columns"][0]
    assert beta_installed[plot["x"].index(start + 4.0)] == 5  # p50 of 10 eligible
    assert beta_installed[-1] == 10
    newer = {**HEALTH, "version": 3}
    assert len(views.extend(history, views.sample(1_767_230_100.0, status, newer))) == 1  # a new version starts over


def test_history_keeps_only_the_ends_of_a_plateau() -> None:
    status = mltask()["status"]
    h: tuple[views.Sample, ...] = ()
    for t in range(10):
        h = views.extend(h, views.sample(float(t), status, HEALTH))
    assert [s.at for s in h] == [0.0, 9.0]


def test_fleet_filter_is_the_crd_grammar() -> None:
    target = views.parse_filter('{matchVersions: {appVersion: ">=10.3"}, matchLabels: {os: android}}')
    assert target.matches({"os": frozenset({"android"}), "appVersion": frozenset({"10.4"})})
    assert not target.matches({"os": frozenset({"android"}), "appVersion": frozenset({"10.2"})})
    with pytest.raises(errors.InvalidSpec, match=r"filter"):
        views.parse_filter("{matchExpressions: [{key: os, operator: Near}]}")
    with pytest.raises(errors.InvalidSpec, match=r"filter: not YAML"):
        views.parse_filter("{unclosed")


def test_aggregate_table_flattens_nested_documents() -> None:
    rows = views.aggregate_table({"counts": {"b": 2, "a": 1}, "values": list(range(40))})
    assert rows[:2] == [("counts.a", "1"), ("counts.b", "2")]
    assert rows[2][0] == "values" and rows[2][1].endswith("(40 values)")


def test_sessions_refuse_forged_altered_and_expired_cookies() -> None:
    s = sessions.Sessions(token=TOKEN)
    assert s.login("not-the-token-at-all", now=0) is None
    cookie = s.login(TOKEN, now=1000)
    assert cookie is not None
    sid = s.session(cookie, now=1001)
    assert sid is not None
    assert s.session(cookie, now=1000 + s.ttl_s + 1) is None
    assert s.session(cookie.replace(".", "x.", 1), now=1001) is None
    assert sessions.Sessions(token=TOKEN).session(cookie, now=1001) is None  # another key
    assert s.csrf_ok(sid, s.csrf(sid)) and not s.csrf_ok(sid, "") and not s.csrf_ok("other", s.csrf(sid))
    with pytest.raises(ValueError, match="16 characters"):
        sessions.Sessions(token="short")


async def test_one_upstream_poll_per_subject_whatever_the_number_of_watchers() -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    async def fetch(subject: str) -> dict:
        calls.append(subject)
        await gate.wait()
        return {"n": len(calls)}

    hub = livehub.Hub(fetch, interval_s=3600)  # one poll each time the test opens the gate
    async with hub.subscribe("tasks") as q1, hub.subscribe("tasks") as q2, hub.subscribe("fleet") as q3:
        gate.set()
        got = await asyncio.gather(q1.get(), q2.get(), q3.get())
        assert hub.watchers("tasks") == 2
        # a page rendered meanwhile reuses the snapshot: no new fetch
        assert await hub.current("tasks") == got[0]
        # ten tabs more on the same subject: still one poller
        async with hub.subscribe("tasks") as q4:
            assert await q4.get() == got[0]
    assert sorted(calls) == ["fleet", "tasks"]
    assert hub.watchers("tasks") == 0


async def test_concurrent_page_loads_share_one_fetch_and_errors_reach_the_pages() -> None:
    calls = 0

    async def fetch(subject: str) -> dict:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if subject == "bad":
            raise RuntimeError("controller down")
        return {"ok": True}

    hub = livehub.Hub(fetch, interval_s=3600)
    await asyncio.gather(*(hub.current("tasks") for _ in range(20)))
    assert calls == 1
    async with hub.subscribe("bad") as q:
        assert await q.get() == {"error": "controller down"}


async def test_subjects_nobody_watches_are_forgotten_beyond_a_bound() -> None:
    async def fetch(subject: str) -> dict:
        if subject.startswith("missing"):
            raise errors.NotFound(subject)
        return {"subject": subject}

    hub = livehub.Hub(fetch, interval_s=3600)
    for i in range(50):
        with pytest.raises(errors.NotFound):
            await hub.current(f"missing-{i}")
    assert hub.subjects() == 0  # a name that never fetched leaves nothing behind
    for i in range(livehub.MAX_IDLE_SUBJECTS + 10):
        await hub.current(f"task:{i}")
    assert hub.subjects() == livehub.MAX_IDLE_SUBJECTS
