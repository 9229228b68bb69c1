"""Triggers in the running agent: event-sequence patterns from the local socket, on-demand RunNow,
cron on an injected clock (no sleeping for schedules). Against the scriptable fake controller."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import tempfile
import time

import pytest
from agent_fakes import wait_until, write_bundle
from test_agent_daemon import make_agent, running, stop

from tether.agent import events as events_client
from tether.proto.v1 import tether_pb2 as pb

INPUTS_TASK = """
import json

def run(ctx):
    inputs = ctx.inputs
    ctx.log(json.dumps(inputs["trigger"]))
    match = inputs.get("match") or {}
    counts = {
        "matched_events": len(match.get("events", [])),
        "window_events": len(inputs.get("events", [])),
        "trigger_" + inputs["trigger"]["type"]: 1,
    }
    for page, row in (inputs.get("aggregates") or {}).get("views", {}).items():
        counts["views_" + page] = int(row["count"])
    epochs = (inputs.get("payload") or {}).get("epochs")
    if epochs is not None:
        counts["epochs"] = epochs
    return {"sample_count": 1, "counts": counts}
"""

CART = {
    "type": "pattern",
    "pattern": {
        "steps": [{"type": "page_view", "page": "item"}, {"type": "add_to_cart", "where": {"price": {"gte": 10}}}],
        "within": 30,
    },
    "window": {"seconds": 600},
    "aggregate": {"name": "views", "by": "page"},
    "cooldownSeconds": 0,
}


@pytest.fixture()
def sock_dir():
    d = pathlib.Path(tempfile.mkdtemp(prefix="tag-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_a_pattern_in_the_event_stream_runs_the_task_with_the_match_as_input(fake, tmp_path, sock_dir) -> None:
    rel = fake.publish("ns/cart", write_bundle(tmp_path / "b", INPUTS_TASK), trigger=CART)
    agent = make_agent(fake, tmp_path, events_socket=sock_dir / "events.sock")
    task = await running(agent)
    await wait_until(lambda: agent.stream.registered() == [rel.name])
    assert "RUNNING" not in fake.states(rel.name)  # a pattern trigger does not run on install

    now = time.time()

    def app() -> list[events_client.Ack]:
        with events_client.EventClient(sock_dir / "events.sock") as c:
            return [
                c.send("page_view", page="home", ts=now),
                c.send("page_view", page="item", ts=now + 1),
                c.send("add_to_cart", page="item", attrs={"price": 5}, ts=now + 2),  # too cheap
                c.send_many([{"type": "add_to_cart", "page": "item", "attrs": {"price": 12}, "ts": now + 3}, {"x": 1}]),
            ]

    acks = await asyncio.to_thread(app)
    assert [a.matched for a in acks] == [0, 0, 0, 1] and acks[3].rejected == 1
    await wait_until(lambda: len(fake.uploads) == 1)
    await stop(agent, task)
    (upload,) = fake.uploads.values()
    assert upload.counts["trigger_pattern"] == 1 and upload.counts["matched_events"] == 2
    assert upload.counts["window_events"] == 4 and upload.counts["views_item"] == 3 and upload.counts["views_home"] == 1
    (record,) = agent.state.runs.values()
    assert record.trigger == "pattern" and record.status == "uploaded"
    assert not list((tmp_path / "dev-1/state/results").glob("*.inputs.json"))  # removed once the run finished


async def test_on_demand_run_now_runs_once_per_request_with_its_payload(fake, tmp_path) -> None:
    rel = fake.publish("ns/train", write_bundle(tmp_path / "b", INPUTS_TASK), trigger={"type": "onDemand"})
    agent = make_agent(fake, tmp_path)
    task = await running(agent)
    await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    await asyncio.sleep(0.2)
    assert not fake.uploads  # onDemand: nothing runs until asked

    def run_now(request_id: str, payload: dict, release: str = rel.name) -> None:
        run = pb.RunNow(release=release, version=1, request_id=request_id, payload_json=json.dumps(payload))
        fake.queues["dev-1"].put_nowait(pb.ServerEvent(run=run))

    run_now("r1", {"epochs": 3})
    run_now("r1", {"epochs": 3})  # the controller repeated itself: still one run
    run_now("x", {}, release="ns/unknown")  # not installed here: ignored
    await wait_until(lambda: len(fake.uploads) == 1)
    run_now("r2", {"epochs": 5})
    await wait_until(lambda: len(fake.uploads) == 2)
    await asyncio.sleep(0.2)
    await stop(agent, task)
    uploads = sorted(fake.uploads.values(), key=lambda u: u.counts["epochs"])
    assert [u.counts["epochs"] for u in uploads] == [3, 5]
    assert all(u.counts["trigger_onDemand"] == 1 for u in uploads)
    assert sorted(k.rsplit(":", 1)[1] for k in fake.uploads) == ["demand-r1", "demand-r2"]


async def test_cron_runs_when_the_injected_clock_says_so(fake, tmp_path) -> None:
    hour = 3600.0
    clock = [(time.time() // hour) * hour + 20 * 60]  # hh:20
    rel = fake.publish(
        "ns/hourly", write_bundle(tmp_path / "b", INPUTS_TASK), trigger={"type": "cron", "schedule": "0 * * * *"}
    )
    agent = make_agent(fake, tmp_path, clock=lambda: clock[0])
    task = await running(agent)
    await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    await asyncio.sleep(0.3)
    assert not fake.uploads  # not due before the next full hour

    clock[0] += 40 * 60 + 5  # (hh+1):00:05
    agent._kick(rel.name)
    await wait_until(lambda: len(fake.uploads) == 1)
    agent._kick(rel.name)
    await asyncio.sleep(0.3)
    assert len(fake.uploads) == 1  # once per firing

    clock[0] += hour  # (hh+2):00:05
    agent._kick(rel.name)
    await wait_until(lambda: len(fake.uploads) == 2)
    await stop(agent, task)
    starts = sorted(r.started_at for r in agent.state.runs.values())
    assert [s % hour for s in starts] == [5.0, 5.0] and starts[1] - starts[0] == hour
    assert {r.trigger for r in agent.state.runs.values()} == {"cron"}
