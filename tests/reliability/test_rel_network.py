"""Network faults between real agents (the daemon) and the controller (issue 14, the wider campaign).

A fault-injecting TCP proxy (`tether.devtools.faultproxy`) sits between the
agents and the controller on loopback and cuts connections in the middle of
a PullBlobs stream and of an UploadResult, loses an upload's acknowledgement,
resets every connection while reports are in flight, throttles, delays,
black-holes and refuses. What must hold whatever it does:

- installs complete by resuming (bytes pulled stay close to the bundle's
  size), verified, installed once, never corrupt;
- every result lands exactly once (idempotency keys);
- the Subscribe stream comes back with backoff (a bounded number of attempts
  while the controller cannot be reached); a short black hole heals in place;
  a real partition (iptables, where root can use it: `tether.devtools.netpartition`)
  is given up by keepalive and the agent converges after it heals;
- no acknowledged report is lost: the controller's counts end equal to what
  the devices did.

Faults are injected at byte counts and at points of progress (not at times),
so each test is deterministic in what it asserts.

Seen while writing these: a black hole that keeps TCP alive (the proxy's
kernel acknowledges, nothing is relayed) is given up by gRPC only after
about 60 s even with a 500 ms keepalive, whereas a partition that drops
packets is given up in about a second (TCP_USER_TIMEOUT follows the
keepalive timeout); so the black-hole test heals the hole within that time.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random

import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, controller_config, start_controller

from tether.agent import client, daemon
from tether.common import admin_client, bundle_files, manifest
from tether.controller import blobs, server
from tether.devtools import faultproxy, netpartition

FAST = client.Backoff(initial_s=0.05, max_s=0.5)
KIB, MIB = 1024, 1024 * 1024
pytestmark = pytest.mark.timeout(240)


def _bundle(root: pathlib.Path, source: str, extra: dict[str, bytes] | None = None) -> manifest.Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(source)
    (root / "bundle.yaml").write_text("name: net-faults\nentrypoint: task.py\n")
    for rel, data in (extra or {}).items():
        (root / rel).write_bytes(data)
    return bundle_files.build_manifest(root)


async def _until(predicate, *, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _agent(tmp_path: pathlib.Path, address: str, i: int, **kw) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=tmp_path / f"dev-{i}" / "state",
        data_dir=tmp_path / f"dev-{i}" / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=f"dev-{i}",
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(i),
        backend_selection=False,
        **kw,
    )


class _Rig:
    """A controller, a fault proxy in front of it, agents behind it; stopped in reverse."""

    def __init__(self, running, proxy: faultproxy.FaultProxy, address: str) -> None:
        self.running = running
        self.proxy = proxy
        self.address = address  # the proxy's: where agents connect
        self.agents: list[daemon.Agent] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start_agents(self, tmp_path: pathlib.Path, n: int, **kw) -> list[daemon.Agent]:
        for _ in range(n):
            agent = _agent(tmp_path, self.address, len(self.agents), **kw)
            self.agents.append(agent)
            self.tasks.append(asyncio.create_task(agent.run()))
        return self.agents

    def calls(self, method: str) -> int:
        stats = self.running.counters.methods.get(f"/tether.v1.DeviceService/{method}")
        return 0 if stats is None else stats.calls

    async def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.proxy.stop()
        await self.running.stop(grace=0.1)


@pytest.fixture()
async def rig(database_url, tmp_path, monkeypatch):
    # Accept keepalive pings every 100 ms (the production floor is 10 s), for the short keepalive of the
    # black-hole test; nothing else here depends on it.
    production = server.server_options

    def options(cfg):
        return [(k, 100 if k == "grpc.http2.min_ping_interval_without_data_ms" else v) for k, v in production(cfg)]

    monkeypatch.setattr(server, "server_options", options)
    running = await start_controller(controller_config(database_url, tmp_path / "blobs", grace_s=0.2))
    proxy = faultproxy.FaultProxy(("127.0.0.1", running.port))
    address = await proxy.start()
    rig = _Rig(running, proxy, address)
    try:
        yield rig
    finally:
        await rig.close()


async def _release(rig: _Rig, tmp_path: pathlib.Path, bundle_dir: str, bundle: manifest.Manifest, name: str) -> int:
    async with admin_client.AdminClient(rig.running.address, token=ADMIN_TOKEN) as adm:
        await adm.upload_bundle(tmp_path / bundle_dir, bundle)
        applied = await adm.apply_release(release=name, manifest_digest=bundle.digest)
    return applied.version


async def _status(rig: _Rig, name: str) -> admin_client.ReleaseStatus:
    async with admin_client.AdminClient(rig.running.address, token=ADMIN_TOKEN) as adm:
        return await adm.get_release_status(name)


async def test_pulls_cut_mid_stream_on_a_slow_link_resume_and_install_once(rig, tmp_path):
    # Given a slow, laggy link that is cut twice in the middle of the 3 MiB blob's PullBlobs stream
    rig.proxy.set(faultproxy.Faults(delay_s=0.002, down_bytes_per_s=6 * MIB))
    rig.proxy.cut(down_after=1 * MIB)
    rig.proxy.cut(down_after=1 * MIB)
    model = os.urandom(3 * MIB)
    bundle = _bundle(tmp_path / "bundle", "def run(ctx):\n    return {'sample_count': 1}\n", {"model.bin": model})
    (agent,) = rig.start_agents(tmp_path, 1)
    await _until(lambda: _true(agent.connected.is_set()), timeout=60, what="the agent to connect")
    version = await _release(rig, tmp_path, "bundle", bundle, "ns/pull")

    # When the agent pulls through it
    async def settled() -> bool:
        s = await _status(rig, "ns/pull")
        return s.succeeded == 1

    await _until(settled, timeout=120, what="the install and run through the cuts")

    # Then both cuts hit, the pull resumed (bytes moved stay near the bundle's size), the install is verified
    assert rig.proxy.pending_cuts == 0 and rig.proxy.stats.resets >= 2
    assert rig.calls("PullBlobs") + rig.calls("PullBlob") >= 3  # two interrupted, one that finished
    # What reached the device (the controller sent more: what was in flight when a link was cut). A cut
    # loses at most the chunk it split (256 KiB); starting over would have moved 1 + 1 + 3 MiB.
    total = sum(f.size for f in bundle.files)
    delivered = rig.proxy.stats.down_bytes
    bound = total + 2 * blobs.DEFAULT_CHUNK_SIZE + 64 * KIB
    assert delivered <= bound, f"{delivered} bytes reached the device for a {total}-byte bundle"
    state = agent.state_dir
    digest = next(f.sha256 for f in bundle.files if f.path == "model.bin").removeprefix("sha256:")
    assert (state / "blobs" / "sha256" / digest).read_bytes() == model
    (install,) = list((state / "installs").iterdir())
    assert [p.name for p in install.iterdir() if p.is_dir()] == [str(version)]
    assert (install / str(version) / "model.bin").read_bytes() == model
    assert not list((state / "blobs" / "partial").glob("*.part"))


async def test_uploads_cut_mid_call_and_acks_lost_land_exactly_once(rig, tmp_path, database_url):
    # Given three devices whose task returns a 640 KB tensor, and a link that cuts the first upload
    # halfway and loses the acknowledgement of the next one (the request reaches the controller)
    source = (
        "import numpy as np\n\n"
        "def run(ctx):\n"
        "    return {'sample_count': 2, 'tensors': {'w': np.full(80000, 0.5)}, 'metrics': {'loss': 1.0}}\n"
    )
    bundle = _bundle(tmp_path / "bundle", source)
    agents = rig.start_agents(tmp_path, 3)
    await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents connect")
    rig.proxy.cut(up_after=300 * KIB)
    rig.proxy.cut(up_after=640 * KIB, hold_down_s=1.0)
    await _release(rig, tmp_path, "bundle", bundle, "ns/upload")

    # When the rollout runs through it
    async def done() -> bool:
        s = await _status(rig, "ns/upload")
        uploaded = all(any(r.status == "uploaded" for r in a.state.runs.values()) for a in agents)
        return s.results == 3 and s.succeeded == 3 and uploaded

    await _until(done, timeout=120, what="every result to land")

    # Then both faults hit, the uploads were retried, and each device's result is stored exactly once
    assert rig.proxy.pending_cuts == 0
    assert rig.calls("UploadResult") >= 4, "the cut upload and the one whose answer was lost are retried"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT device_id, count(*), sum(sample_count) FROM results WHERE release = 'ns/upload' GROUP BY device_id"
        ).fetchall()
    assert sorted((d, int(n), int(s)) for d, n, s in rows) == [("dev-0", 1, 2), ("dev-1", 1, 2), ("dev-2", 1, 2)]


async def test_resets_while_reports_are_in_flight_lose_no_acknowledged_report(rig, tmp_path):
    # Given six devices and a task that takes a moment
    source = "import time\n\ndef run(ctx):\n    time.sleep(0.3)\n    return {'sample_count': 1}\n"
    bundle = _bundle(tmp_path / "bundle", source)
    agents = rig.start_agents(tmp_path, 6)
    await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents connect")
    await _release(rig, tmp_path, "bundle", bundle, "ns/reports")

    # When every connection is reset each time the controller's counts move (reports in flight on others)
    seen: tuple[int, int, int] = (-1, -1, -1)
    resets = 0
    for _ in range(2000):
        s = await _status(rig, "ns/reports")
        if s.succeeded == 6 and s.results == 6:
            break
        now = (s.installed, s.succeeded, s.results)
        if now != seen and resets < 8:
            seen = now
            resets += rig.proxy.reset_all()
        await asyncio.sleep(0.05)

    # Then the counts end exact: every device installed, ran, reported and uploaded once
    s = await _status(rig, "ns/reports")
    assert (s.installed, s.succeeded, s.results, s.failed) == (6, 6, 6, 0)
    assert resets >= 3
    await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents reconnect")


async def test_a_short_black_hole_heals_in_place_and_refusals_are_retried_with_backoff(rig, tmp_path):
    (agent,) = rig.start_agents(tmp_path, 1)
    await _until(lambda: _true(agent.connected.is_set()), timeout=60, what="the agent to connect")
    bundle = _bundle(tmp_path / "bundle", "def run(ctx):\n    return {'sample_count': 1}\n")
    v2 = _bundle(tmp_path / "bundle2", "def run(ctx):\n    return {'sample_count': 2}\n")

    # When the link becomes a black hole (nothing answers, nothing is closed) while a release is applied
    rig.proxy.set(faultproxy.Faults(stall=True))
    version = await _release(rig, tmp_path, "bundle", bundle, "ns/hole")
    await asyncio.sleep(1.0)
    assert "ns/hole" not in agent.state.installed  # the Notify is held in the hole
    # Then, healed within the keepalive, the same connection carries the held Notify and the install goes on
    accepted = rig.proxy.stats.accepted
    rig.proxy.heal()

    async def installed(v: int) -> bool:
        held = agent.state.installed.get("ns/hole")
        return held is not None and held.version == v and (await _status(rig, "ns/hole")).succeeded == 1

    await _until(lambda: installed(version), timeout=60, what="the install after the hole closed")
    assert rig.proxy.stats.accepted == accepted, "no new connection was needed"

    # When the controller then refuses connections for a while (the live link reset)
    rig.proxy.set(faultproxy.Faults(refuse=True))
    await _until(lambda: _true(not agent.connected.is_set()), timeout=30, what="the agent to notice")
    await _until(lambda: _true(rig.proxy.stats.refused >= 4), timeout=60, what="reconnection attempts")
    refused_at_4 = asyncio.get_running_loop().time()
    version = await _release(rig, tmp_path, "bundle2", v2, "ns/hole")
    await asyncio.sleep(2.0)
    attempts = rig.proxy.stats.refused

    # Then it keeps trying, paced by backoff (its own: 0.05 s doubling to 0.5 s; gRPC's reconnect backoff under
    # it): a few a second, not a tight loop (a slower machine only makes fewer)
    elapsed = asyncio.get_running_loop().time() - refused_at_4
    assert attempts <= 4 + elapsed / (FAST.max_s * (1 - FAST.jitter)) + 4, f"{attempts} attempts in {elapsed:.1f}s"

    # And once healed it reconnects, gets the new version in its Sync and installs it
    rig.proxy.heal()
    await _until(lambda: installed(version), timeout=60, what="the install after the refusals ended")


async def _true(value: bool) -> bool:
    return value


async def test_a_stream_whose_caller_left_is_not_aborted_twice():
    """A Subscribe ending (e.g. superseded) after its connection dropped: no second abort, no INTERNAL logged.

    Seen through the proxy: aborting a stream whose caller was gone raised inside gRPC, and the edge then
    tried to answer INTERNAL on the finished call ("Abort already called" in the controller's log).
    """
    import grpc

    from tether.controller import edge

    class GoneContext:
        aborted = 0

        def done(self) -> bool:
            return True

        async def abort(self, *args, **kwargs):
            self.aborted += 1
            raise AssertionError("a finished call was aborted")

    async def stream(request, context):
        yield 1
        raise RuntimeError("send status failed: the call is gone")

    handler = grpc.unary_stream_rpc_method_handler(stream)
    wrapped = edge._mapped(handler, edge._anyone)
    context = GoneContext()
    assert [item async for item in wrapped.unary_stream(None, context)] == [1]
    assert context.aborted == 0


@pytest.mark.skipif(not netpartition.available(), reason="needs root and a working iptables")
async def test_an_iptables_partition_heals_and_the_agent_converges(rig, tmp_path):
    # Given an agent with a short keepalive and connect timeout (a SYN into the partition is dropped, not refused),
    # connected through the proxy's port, which is what gets cut off
    options = [
        *client.DEFAULT_OPTIONS,
        ("grpc.keepalive_time_ms", 500),
        ("grpc.keepalive_timeout_ms", 500),
        ("grpc.http2.min_time_between_pings_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 1000),
    ]
    (agent,) = rig.start_agents(tmp_path, 1, channel_options=options)
    await _until(lambda: _true(agent.connected.is_set()), timeout=60, what="the agent to connect")
    bundle = _bundle(tmp_path / "bundle", "def run(ctx):\n    return {'sample_count': 1}\n")

    # When the kernel drops every packet between them and a release is applied meanwhile
    with netpartition.partition(rig.proxy.port):
        version = await _release(rig, tmp_path, "bundle", bundle, "ns/partition")
        # Then keepalive gives the link up, and nothing is installed while cut off
        await _until(lambda: _true(not agent.connected.is_set()), timeout=60, what="keepalive to notice")
        assert "ns/partition" not in agent.state.installed

    # And once the partition heals the agent reconnects and installs, reported exactly once
    async def installed() -> bool:
        held = agent.state.installed.get("ns/partition")
        return held is not None and held.version == version and (await _status(rig, "ns/partition")).succeeded == 1

    await _until(installed, timeout=90, what="the install after the partition healed")
