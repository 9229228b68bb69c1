"""The dashboard's app through Starlette's TestClient over a recorded upstream: login, pages, controls, live updates."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("starlette")
from dashboard_support import ADMIN_SECRET, TOKEN, Recorded, device, mltask, release
from starlette.testclient import TestClient

from tether.dashboard import app as app_mod


def make(*, controls: bool = False, interval_s: float = 0.2, **kw) -> tuple[TestClient, Recorded]:
    rec = Recorded()
    rec.objects["ml/digits"] = mltask()
    rec.releases["ml/digits"] = release("ml/digits", aggregate={"counts": {"0": 4, "1": 6}, "mean": [0.1, 0.9]})
    rec.fleet = [device(1), device(2, os="ios"), device(3, tier="low")]
    app = app_mod.create_app(rec, token=TOKEN, allow_controls=controls, interval_s=interval_s, **kw)
    return TestClient(app, follow_redirects=False), rec


def login(client: TestClient) -> None:
    r = client.post("/login", data={"token": TOKEN, "next": "/"})
    assert r.status_code == 303


def test_pages_need_a_login_and_a_wrong_token_is_refused() -> None:
    client, _ = make()
    r = client.get("/tasks/ml/digits")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert client.get("/live/tasks").status_code == 401
    r = client.post("/login", data={"token": "wrong-token-wrong-token"})
    assert r.status_code == 401 and "not the dashboard" in r.text
    assert "tether_dashboard" not in r.headers.get("set-cookie", "")


def test_login_sets_an_httponly_samesite_cookie_and_refuses_foreign_redirects() -> None:
    client, _ = make(secure_cookies=True)
    r = client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie


def test_a_bearer_token_works_without_a_cookie() -> None:
    client, _ = make()
    r = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "ml/digits" in r.text


def test_tasks_page_shows_phase_stage_counts_and_conditions() -> None:
    client, _ = make()
    login(client)
    r = client.get("/")
    assert r.status_code == 200
    row = re.search(r'<tr data-task="ml/digits">(.*?)</tr>', r.text, re.S)
    assert row
    for text in ("Progressing", "gray", ">60<", ">30<", ">24<", "Progressing=True"):
        assert text in row.group(1)
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert r.headers["x-frame-options"] == "DENY"


def test_task_page_shows_stages_gates_plot_data_events_and_says_not_federated() -> None:
    client, rec = make()
    rec.event_docs = [{"type": "Normal", "reason": "StagePassed", "message": "stage beta passed", "count": 1}]
    login(client)
    r = client.get("/tasks/ml/digits")
    assert r.status_code == 200
    assert "successRate ≥ 0.95" in r.text and "devicesReporting ≥ 5" in r.text
    assert "StagePassed" in r.text
    assert "Not a federated task." in r.text
    plot = json.loads(re.search(r'<script type="application/json" id="coverage-data">(.*?)</script>', r.text, re.S)[1])
    labels = [s["label"] for s in plot["series"]]
    assert "beta installed" in labels and "gray succeeded" in labels
    assert any(s["kind"] == "threshold" for s in plot["series"])
    assert len(plot["columns"]) == len(plot["series"]) and all(len(c) == len(plot["x"]) for c in plot["columns"])


def test_no_secret_is_rendered() -> None:
    client, _ = make(controls=True)
    login(client)
    for path in ("/", "/tasks/ml/digits", "/tasks/ml/digits/aggregate", "/fleet", "/tasks/ml/digits/control/pause"):
        text = client.get(path).text
        assert TOKEN not in text and ADMIN_SECRET not in text and "X-Amz-Signature" not in text, path


def test_aggregate_page_is_a_table() -> None:
    client, _ = make()
    login(client)
    r = client.get("/tasks/ml/digits/aggregate")
    assert '<th scope="row">counts.1</th><td>6</td>' in r.text and "0.1 0.9" in r.text


def test_fleet_filters_by_the_crd_selector_grammar_and_names_a_bad_filter() -> None:
    client, _ = make()
    login(client)
    r = client.get("/fleet")
    assert "3 devices" in r.text and "ctl-0" in r.text
    r = client.get("/fleet", params={"filter": "{matchLabels: {os: android}, exclude: [{matchLabels: {tier: low}}]}"})
    assert "1 device<" in r.text and 'data-device="dev-001"' in r.text and "dev-003" not in r.text
    r = client.get("/fleet", params={"filter": "{matchLabel: {os: android}}"})
    assert r.status_code == 400 and "filter" in r.text and "matchLabel" in r.text


def test_missing_task_and_bad_names_are_clear_errors() -> None:
    client, _ = make()
    login(client)
    r = client.get("/tasks/ml/nope")
    assert r.status_code == 404 and "ml/nope does not exist" in r.text
    r = client.get("/tasks/ml/Bad_Name")
    assert r.status_code == 400 and "name:" in r.text


def test_controls_are_off_by_default() -> None:
    client, rec = make()
    login(client)
    assert "Rollout controls" not in client.get("/tasks/ml/digits").text
    assert client.get("/tasks/ml/digits/control/pause").status_code == 403
    assert client.post("/tasks/ml/digits/control/pause", data={"csrf": "x"}).status_code == 403
    assert rec.controls == []


def test_a_control_needs_confirmation_and_a_csrf_token() -> None:
    client, rec = make(controls=True)
    login(client)
    page = client.get("/tasks/ml/digits/control/pause")
    assert page.status_code == 200 and "Yes, pause" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    assert client.post("/tasks/ml/digits/control/pause", data={}).status_code == 403
    assert client.post("/tasks/ml/digits/control/pause", data={"csrf": csrf + "x"}).status_code == 403
    assert rec.controls == []
    r = client.post("/tasks/ml/digits/control/pause", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/tasks/ml/digits?done=pause"
    assert rec.controls == [("pause", "ml", "digits")] and rec.objects["ml/digits"]["spec"]["paused"] is True
    assert client.post("/tasks/ml/digits/control/explode", data={"csrf": csrf}).status_code == 404


def test_another_session_csrf_token_is_refused() -> None:
    client, rec = make(controls=True)
    login(client)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/tasks/ml/digits/control/abort").text)[1]
    client.cookies.clear()
    login(client)  # a new session: the old page's token no longer holds
    assert client.post("/tasks/ml/digits/control/abort", data={"csrf": csrf}).status_code == 403
    assert rec.controls == []


def test_live_updates_carry_fragments_and_plot() -> None:
    client, _ = make()
    login(client)
    with client.stream("GET", "/live/tasks/ml/digits") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                msg = json.loads(line[6:])
                break
    assert set(msg["fragments"]) >= {"summary", "stages", "events", "federated", "aggregate", "live-status"}
    assert msg["plot"]["series"] and msg["fplot"] is None


def test_tabs_on_one_subject_share_its_poller_and_release_it_when_closed() -> None:
    client, _ = make(interval_s=60)
    login(client)
    hub = client.app.state.hub  # type: ignore[attr-defined]

    def first_message(r) -> dict:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])
        raise AssertionError("no message")

    with client.stream("GET", "/live/tasks") as one, client.stream("GET", "/live/tasks") as two:
        first_message(one), first_message(two)
        assert hub.watchers("tasks") == 2
        assert hub.fetches["tasks"] == 1  # one poller for both tabs
    client.get("/healthz")
    assert hub.watchers("tasks") == 0


def test_kubernetes_auth_checks_the_token_with_the_api_server_and_controls_go_as_that_user() -> None:
    client, rec = make(controls=True, auth="kubernetes")
    rec.kube_users = {"alice-k8s-token": True, "bob-k8s-token": False}
    r = client.post("/login", data={"token": "nobody"})
    assert r.status_code == 401 and "refused the credential" in r.text
    r = client.post("/login", data={"token": "bob-k8s-token"})
    assert r.status_code == 401 and "not allowed to LIST mltasks" in r.text
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 303  # no dashboard token
    r = client.post("/login", data={"token": "alice-k8s-token"})
    assert r.status_code == 303 and "alice-k8s-token" not in r.headers["set-cookie"]
    page = client.get("/tasks/ml/digits/control/promote")
    assert "alice-k8s-token" not in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    assert client.post("/tasks/ml/digits/control/promote", data={"csrf": csrf}).status_code == 303
    assert rec.user_tokens == ["alice-k8s-token"]
    cookie = client.cookies.get("tether_dashboard")
    assert client.get("/").status_code == 200
    client.post("/logout")
    client.cookies.set("tether_dashboard", cookie)  # the old cookie, replayed
    assert client.get("/").status_code == 303  # the server forgot the session with its token


def test_token_auth_sends_controls_with_the_dashboard_credentials() -> None:
    client, rec = make(controls=True)
    login(client)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/tasks/ml/digits/control/resume").text)[1]
    client.post("/tasks/ml/digits/control/resume", data={"csrf": csrf})
    assert rec.user_tokens == [None]
