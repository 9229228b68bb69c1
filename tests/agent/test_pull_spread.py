"""Pull spreading: a change told to many devices at once asks each to start pulling at a random moment."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from agent_fakes import BOOTSTRAP, wait_until, write_bundle

from tether.agent import client, daemon
from tether.controller import hub, releases
from tether.devtools import simagent
from tether.spec import selectors

FAST = client.Backoff(initial_s=0.02, max_s=0.2)
TASK = "def run(ctx):\n    return {'sample_count': 1}\n"


# ---------------------------------------------------------------- the controller's side (the hub)


def _release(version: int = 1) -> releases.Release:
    spec = releases.parse_spec(
        release="ns/t",
        generation=1,
        manifest_digest="sha256:" + "ab" * 32,
        target_json="{}",
        trigger_json="",
        aggregation_json="{}",
        paused=False,
        resources_json="",
    )
    return releases.Release(spec=spec, version=version, target=selectors.parse_target(spec.target))


def _connect(h: hub.Hub, n: int) -> list[hub.Connection]:
    return [h.connect(device_id=f"d{i}", facts={}) for i in range(n)]


def test_the_window_is_devices_over_the_planned_rate_capped():
    h = hub.Hub(pull_rate=100, max_pull_spread_s=5)
    assert h.pull_spread_ms(0) == 0 and h.pull_spread_ms(1) == 0  # one device: no one to wait for
    assert h.pull_spread_ms(250) == 2500
    assert h.pull_spread_ms(10_000) == 5000  # capped
    assert hub.Hub(pull_rate=0).pull_spread_ms(10_000) == 0  # spreading off
    with pytest.raises(Exception, match="must not be negative"):
        hub.Hub(pull_rate=-1)


async def test_every_device_told_at_once_gets_the_same_window():
    h = hub.Hub(queue_size=4, pull_rate=100)
    conns = _connect(h, 300)
    fan = h.release_changed(before=None, after=_release())
    assert len(fan.notified) == 300
    spreads = {c.queue.get_nowait().notify.pull_spread_ms for c in conns}
    assert spreads == {3000}


async def test_a_single_device_pulls_at_once():
    h = hub.Hub(pull_rate=100)
    [conn] = _connect(h, 1)
    h.release_changed(before=None, after=_release())
    assert conn.queue.get_nowait().notify.pull_spread_ms == 0


# ---------------------------------------------------------------- the agents' side


class LatestMoment(random.Random):
    """Draws every moment at the end of its window: the longest wait the spread allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def latest_moment_agent(fake, tmp_path) -> daemon.Agent:
    return daemon.Agent(
        controller=fake.address,
        state_dir=tmp_path / "state",
        data_dir=tmp_path / "data",
        bootstrap_token=BOOTSTRAP,
        device_id="dev-1",
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=LatestMoment(0),
    )


async def test_the_agent_waits_for_its_moment_in_the_window(fake, tmp_path):
    fake.pull_spread_ms = 400
    agent = latest_moment_agent(fake, tmp_path)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.connected.is_set() or task.done(), timeout=10)
        told = asyncio.get_running_loop().time()
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK))
        await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    assert fake.pull_times[0] - told >= 0.39


async def test_without_a_window_the_agent_pulls_at_once(fake, tmp_path):
    agent = latest_moment_agent(fake, tmp_path)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.connected.is_set() or task.done(), timeout=10)
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK))
        await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    assert agent.puller.notified.pending_pulls == {}


async def test_the_simulated_agent_spreads_its_pull_like_the_real_one(fake, tmp_path):
    fake.pull_spread_ms = 300
    sim = simagent.SimAgent(
        channel=grpc.aio.insecure_channel(fake.address),
        device_id="sim-1",
        attributes={"os": "android"},
        bootstrap_token=BOOTSTRAP,
        backoff=client.Backoff(initial_s=0.02, max_s=0.2),
        rng=LatestMoment(0),
    )
    task = asyncio.create_task(sim.run())
    try:
        await wait_until(lambda: sim.connected, timeout=10)
        told = asyncio.get_running_loop().time()
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK))
        await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert fake.pull_times[0] - told >= 0.29


def test_the_pull_moment_is_in_the_window_and_never_pushed_back():
    from tether.agent import pull

    rng = random.Random(1)
    first = pull.pull_moment(None, spread_ms=10_000, now=100.0, rng=rng)
    assert first is not None and 100.0 <= first <= 110.0
    again = pull.pull_moment(first, spread_ms=10_000, now=101.0, rng=LatestMoment(0))
    assert again == first  # a later Notify with a later draw keeps the sooner moment
    sooner = pull.pull_moment(first, spread_ms=10_000, now=101.0, rng=EarliestMoment(0))
    assert sooner == 101.0  # a sooner draw wins
    assert pull.pull_moment(first, spread_ms=0, now=101.0, rng=rng) is None  # no window: at once
    assert pull.pull_moment(50.0, spread_ms=1000, now=101.0, rng=LatestMoment(0)) == 102.0  # a past moment is gone


class EarliestMoment(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a
