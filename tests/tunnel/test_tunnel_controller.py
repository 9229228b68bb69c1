"""The tunnel end to end: real agent daemons and a real controller (gRPC on loopback, embedded Postgres) to a
real redis-server, read back by a consumer group. Delivery and order, duplicates after a retry, a crash with
a full outbox, limits on both ends, forged senders."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from tunnel_helpers import prefix_of, read_all, tunnel_url, write_bundle

from tether.agent import client, daemon
from tether.common import admin_client, auth, bundle_files
from tether.controller.tunnel import redis_streams
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.proto.v1 import tunnel_pb2, tunnel_pb2_grpc
from tether.spec import emits

pytest.importorskip("tether.controller.server")

FAST = client.Backoff(initial_s=0.05, max_s=0.5)

EMITTER = """
import json

def run(ctx):
    for i in range(25):
        ctx.emit("features", json.dumps({"i": i, "pad": "x" * 2000}))
    return {"sample_count": 1}
"""

GREEDY = """
import json
from tether.agent.tunnel.emitter import EmitRefused

def run(ctx):
    refused = []
    try:
        ctx.emit("features", b"x" * 2000)       # over this device's 1000-byte payload limit
    except EmitRefused as e:
        refused.append([e.limit, str(e)])
    sent = []
    for i in range(4):                        # a burst of 3 records, then nothing for a long time
        try:
            sent.append(ctx.emit("features", {"i": i}))
        except EmitRefused as e:
            refused.append([e.limit, str(e)])
    try:
        ctx.emit("bad topic", b"")
    except EmitRefused as e:
        refused.append([e.limit, str(e)])
    ctx.log(json.dumps(refused))
    return {"sample_count": 1, "counts": {"sent": len(sent), "refused": len(refused)}}
"""


STREAM_FEATURES = """
def run(ctx):
    # What the on-device stream processor made of the events: the match and the window's aggregates.
    inputs = ctx.inputs
    ctx.emit("cart-features", {"matched": len(inputs["match"]["events"]), "views": inputs["aggregates"]["views"]})
    return {"sample_count": 1}
"""

CART = {
    "type": "pattern",
    "pattern": {"steps": [{"type": "page_view", "page": "item"}, {"type": "add_to_cart"}], "within": 30},
    "window": {"seconds": 600},
    "aggregate": {"name": "views", "by": "page"},
}


@pytest.fixture()
def url(broker_url: str) -> str:
    return tunnel_url(broker_url)


@pytest.fixture()
async def tunnel_controller(start, controller_config, url):
    return await start(controller_config, tunnel_url=url)


@pytest.fixture()
async def tchannel(tunnel_controller):
    async with grpc.aio.insecure_channel(tunnel_controller.address) as ch:
        yield ch


async def enroll(channel: grpc.aio.Channel, device_id: str) -> str:
    req = pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id=device_id))
    return (await pb_grpc.DeviceServiceStub(channel).Enroll(req)).credential


def agent_for(address: str, root, device_id: str, **kw) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=root / device_id,
        data_dir=root / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=device_id,
        attributes={"app": "shop"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        backend_selection=False,
        **kw,
    )


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def publish(address: str, directory, release: str, trigger: dict | None = None) -> None:
    async with admin_client.AdminClient(target=address, token=ADMIN_TOKEN) as adm:
        bundle = bundle_files.build_manifest(directory)
        await adm.upload_bundle(directory, bundle)
        await adm.apply_release(
            release=release, manifest_digest=bundle.digest, trigger=trigger or {"type": "onInstall"}
        )


async def succeeded(address: str, release: str, n: int) -> bool:
    async with admin_client.AdminClient(target=address, token=ADMIN_TOKEN) as adm:
        status = await adm.get_release_status(release)
        assert status.failed == 0
        return status.succeeded >= n


def consumer(url: str, topic: str = "features") -> redis_streams.RedisStreamsConsumer:
    return redis_streams.RedisStreamsConsumer.from_url(url, topic=topic, group="test", name="c", start="0")


async def test_emits_of_running_tasks_reach_a_consumer_in_order_per_device(tunnel_controller, url, tmp_path) -> None:
    agents = [agent_for(tunnel_controller.address, tmp_path, f"phone-{i}") for i in (1, 2)]
    runs = [asyncio.create_task(a.run()) for a in agents]
    c = consumer(url)
    try:
        await publish(tunnel_controller.address, write_bundle(tmp_path / "b", EMITTER), "default/emitter")
        got = await read_all(c, 50, rounds=600)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs)
        await c.close()
    assert len(got) == 50
    for device in ("phone-1", "phone-2"):
        mine = [d for d in got if d.device == device]
        assert [json.loads(d.payload)["i"] for d in mine] == list(range(25))  # every record, in order
        assert [d.seq for d in mine] == sorted(d.seq for d in mine) and len({d.seq for d in mine}) == 25
        assert {d.release for d in mine} == {"default/emitter"} and all(d.key == f"{device}:{d.seq}" for d in mine)
    assert all(a.tunnel is not None and len(a.tunnel.outbox) == 0 for a in agents)


async def test_an_emit_too_large_or_too_fast_is_refused_in_the_task_and_nothing_else_is(
    tunnel_controller, url, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="tether.agent.runs")
    limits = emits.TunnelLimits(max_payload_bytes=1000, records_per_s=0.001, burst_records=3, burst_bytes=10_000)
    agent = agent_for(tunnel_controller.address, tmp_path, "phone-1", tunnel_limits=limits)
    run = asyncio.create_task(agent.run())
    c = consumer(url)
    try:
        await publish(tunnel_controller.address, write_bundle(tmp_path / "b", GREEDY), "default/greedy")
        await until(lambda: succeeded(tunnel_controller.address, "default/greedy", 1))  # the run itself succeeded
        got = await read_all(c, 3, rounds=100)
    finally:
        agent.stop()
        await run
        await c.close()
    assert [json.loads(d.payload) for d in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert agent.tunnel is not None
    assert dict(agent.tunnel.refused) == {
        ("default/greedy", "payload_bytes"): 1,
        ("default/greedy", "records_per_s"): 1,
        ("default/greedy", "topic"): 1,
    }
    logged = [r.getMessage() for r in caplog.records if "[default/greedy]" in r.getMessage()]
    (refusals,) = [json.loads(m.split("] ", 1)[1]) for m in logged]
    assert [limit for limit, _ in refusals] == ["payload_bytes", "records_per_s", None]
    assert "payload of 2000 bytes, at most 1000 allowed" in refusals[0][1]
    assert "retry in" in refusals[1][1] and refusals[2][1].startswith("topic: ")


async def test_stream_processor_outputs_reach_the_cloud_through_a_pattern_triggered_task(
    tunnel_controller, url, tmp_path
) -> None:
    agent = agent_for(tunnel_controller.address, tmp_path, "phone-s")
    run = asyncio.create_task(agent.run())
    c = consumer(url, topic="cart-features")
    try:
        await publish(tunnel_controller.address, write_bundle(tmp_path / "b", STREAM_FEATURES), "default/cart", CART)
        await until(lambda: _true(agent.stream.registered() == ["default/cart"]))
        now = time.time()
        ack = agent.stream.ingest(
            [
                {"type": "page_view", "page": "home", "ts": now},
                {"type": "page_view", "page": "item", "ts": now + 1},
                {"type": "add_to_cart", "page": "item", "ts": now + 2},
            ]
        )
        assert ack.matched == 1
        (got,) = await read_all(c, 1, rounds=300)
    finally:
        agent.stop()
        await run
        await c.close()
    doc = json.loads(got.payload)
    assert doc["matched"] == 2 and doc["views"]["item"]["count"] == 2 and doc["views"]["home"]["count"] == 1
    assert (got.device, got.release) == ("phone-s", "default/cart")


def _lost_ack_once(send):
    """`send`, but the first call's answer is lost after the controller acted on it (a retry follows)."""
    lost = []

    async def wrapped(batch):
        ack = await send(batch)
        if not lost:
            lost.append(ack)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "lost")
        return ack

    return wrapped, lost


async def test_a_batch_resent_after_a_lost_ack_is_dropped_by_key(tunnel_controller, url, tmp_path) -> None:
    from tether.agent.tunnel import relay

    device = client.DeviceClient(tunnel_controller.address)
    device.credential = (
        await device.enroll(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="phone-r"))
    ).credential
    send, lost = _lost_ack_once(device.emit)
    tunnel = relay.Tunnel(state_dir=tmp_path / "s", send=send, backoff=FAST, serve_socket=False)
    for i in range(5):  # in the outbox before the uplink starts: one batch
        await asyncio.to_thread(tunnel.outbox.open)
        tunnel.emit("features", b"%d" % i)
    await tunnel.start()
    c = consumer(url)
    try:
        await until(lambda: _true(len(tunnel.outbox) == 0))
        got = await read_all(c, 5)
        assert not await c.read(count=10, block_ms=200)
    finally:
        await tunnel.stop()
        await device.close()
        await c.close()
    assert lost[0].accepted == 5
    assert (tunnel.uplink.sent, tunnel.uplink.duplicates) == (0, 5)  # the retry: all five known already
    assert [d.payload for d in got] == [b"0", b"1", b"2", b"3", b"4"]
    assert tunnel_controller.tunnel.duplicates == 5
    metrics = tunnel_controller.metrics.registry
    assert metrics.get_sample_value("tether_controller_tunnel_records_total", {"outcome": "accepted"}) == 5
    assert metrics.get_sample_value("tether_controller_tunnel_records_total", {"outcome": "duplicate"}) == 5


async def _true(value: bool) -> bool:
    return value


async def test_an_agent_killed_with_a_full_outbox_delivers_everything_after_a_restart(
    start, controller_config, url, tmp_path
) -> None:
    """Records acknowledged to a task while the controller had no broker, then SIGKILL: none is lost."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from tether.agent.tunnel import relay

        async def never(batch):
            await asyncio.sleep(3600)

        async def main():
            t = relay.Tunnel(state_dir={str(tmp_path / "phone-k")!r}, send=never, serve_socket=False)
            await t.start()
            for i in range(30):
                print(t.emit("features", b"%d" % i, release="ns/t"), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = [int(s) for s in proc.stdout.split()]
    assert len(acked) == 30
    running = await start(controller_config, tunnel_url=url)
    agent = agent_for(running.address, tmp_path, "phone-k")
    run = asyncio.create_task(agent.run())
    c = consumer(url)
    try:
        got = await read_all(c, 30, rounds=300)
    finally:
        agent.stop()
        await run
        await c.close()
    assert [d.seq for d in got] == acked and [d.payload for d in got] == [b"%d" % i for i in range(30)]
    assert {d.device for d in got} == {"phone-k"} and {d.release for d in got} == {"ns/t"}


def _batch(seqs, payload: bytes = b"x", topic: str = "features") -> tunnel_pb2.EmitBatch:
    return tunnel_pb2.EmitBatch(
        records=[tunnel_pb2.EmitRecord(seq=s, topic=topic, payload=payload, emitted_at_ms=1) for s in seqs]
    )


async def test_the_controller_refuses_over_limit_batches_naming_the_limit(tchannel, url) -> None:
    token = await enroll(tchannel, "phone-x")
    stub = tunnel_pb2_grpc.TunnelServiceStub(tchannel)
    md = auth.bearer_metadata(token)
    limits = emits.TunnelLimits()
    cases = [
        (_batch([1], b"x" * (limits.max_payload_bytes + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_bytes"),
        (_batch(range(1, limits.max_batch_records + 2)), grpc.StatusCode.RESOURCE_EXHAUSTED, "batch_records"),
        (_batch([1], topic="no spaces"), grpc.StatusCode.INVALID_ARGUMENT, "records[0].topic"),
        (_batch([5, 4]), grpc.StatusCode.INVALID_ARGUMENT, "records[1].seq"),
        (tunnel_pb2.EmitBatch(), grpc.StatusCode.INVALID_ARGUMENT, "at least one record"),
    ]
    for batch, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Emit(batch, metadata=md)
        assert info.value.code() == code and text in info.value.details(), info.value.details()
    # The rate: the agent's burst with the controller's slack (2 x 200 records), then refused.
    seq, accepted = 0, 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(10):
            ack = await stub.Emit(_batch(range(seq + 1, seq + 101)), metadata=md)
            seq, accepted = seq + 100, accepted + ack.accepted
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tunnel limit records_per_s exceeded" in info.value.details()
    assert 400 <= accepted < 1000  # the burst (plus what refilled at 50/s meanwhile), then refused
    r = redis_streams.RedisStreamsBroker.from_url(url)
    assert await r.client.xlen(f"{prefix_of(url)}:features") == accepted  # nothing of a refused batch
    await r.close()


async def test_a_forged_device_cannot_emit_and_a_record_names_only_its_sender(tchannel, url) -> None:
    a, _ = await enroll(tchannel, "phone-a"), await enroll(tchannel, "phone-b")
    stub = tunnel_pb2_grpc.TunnelServiceStub(tchannel)
    for forged in (a.replace("v1.phone-a.", "v1.phone-b.", 1), "x" * 40, ""):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Emit(_batch([1]), metadata=auth.bearer_metadata(forged) if forged else ())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ack = await stub.Emit(_batch([7], b"mine"), metadata=auth.bearer_metadata(a))
    assert ack.accepted == 1 and ack.acked_through == 7
    c = consumer(url)
    (only,) = await read_all(c, 1)
    await c.close()
    assert (only.device, only.seq, only.payload) == ("phone-a", 7, b"mine")


async def test_without_a_broker_emits_are_refused_and_wait_in_the_outbox(controller, tmp_path) -> None:
    agent = agent_for(controller.address, tmp_path, "phone-n")
    run = asyncio.create_task(agent.run())
    try:
        await until(lambda: _true(agent.connected.is_set()))
        assert agent.tunnel is not None
        agent.tunnel.emit("features", b"kept")
        await until(lambda: _true(agent.tunnel.uplink.failures >= 1))
        assert (
            "FAILED_PRECONDITION" in agent.tunnel.uplink.last_error
            and "TETHER_TUNNEL_URL" in agent.tunnel.uplink.last_error
        )
        assert len(agent.tunnel.outbox) == 1
    finally:
        agent.stop()
        await run
