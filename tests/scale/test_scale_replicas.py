"""Several controller replicas on one database: a release change reaches agents on every replica."""

from __future__ import annotations

import asyncio
import os

import grpc
import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, start_controller

from tether.common import auth, manifest
from tether.common.admin_client import AdminClient
from tether.controller import replicas
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

ANDROID = {"matchLabels": {"os": "android"}}


async def _device(address: str, device_id: str) -> tuple[grpc.aio.Channel, grpc.aio.UnaryStreamCall]:
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.DeviceServiceStub(channel)
    enrolled = await stub.Enroll(
        pb.EnrollRequest(
            bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id=device_id, attributes={"os": "android"})
        )
    )
    stream = stub.Subscribe(pb.SubscribeRequest(), metadata=auth.bearer_metadata(enrolled.credential))
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.WhichOneof("event") == "sync"
    return channel, stream


async def _publish(client: AdminClient, tmp_path, name: str) -> str:
    root = tmp_path / name
    root.mkdir()
    (root / "task.py").write_bytes(b"def run(ctx):\n    return {'sample_count': 1}\n")
    (root / "model.bin").write_bytes(os.urandom(1000))
    bundle = manifest.hash_directory(root, name="demo-task", entrypoint="task.py")
    return (await client.upload_bundle(root, bundle)).digest


async def _stats(address: str) -> pb.ServerStats:
    async with grpc.aio.insecure_channel(address) as ch:
        return await pb_grpc.StatsServiceStub(ch).GetServerStats(
            pb.GetServerStatsRequest(), metadata=auth.bearer_metadata(ADMIN_TOKEN)
        )


async def test_a_release_applied_on_replica_a_reaches_an_agent_connected_to_replica_b(
    scale_config, tmp_path, database_url
):
    a = await start_controller(scale_config)
    b = await start_controller(scale_config)
    channels = []
    try:
        assert a.replica_id != b.replica_id
        ch_b, on_b = await _device(b.address, "phone-b")
        ch_a, on_a = await _device(a.address, "phone-a")
        channels += [ch_a, ch_b]
        async with AdminClient(a.address, token=ADMIN_TOKEN) as client:
            digest = await _publish(client, tmp_path, "v1")
            applied = await client.apply_release(release="ns/task", manifest_digest=digest, target=ANDROID)

            # Given a release applied through A, when B hears of it, then B's device is notified.
            event = await asyncio.wait_for(on_b.read(), 5)
            assert event.notify.task.release == "ns/task" and event.notify.task.version == applied.version
            assert event.notify.sent_at_ms > 0
            # A's own device hears it once: A fanned out locally and ignores its own announcement.
            assert (await asyncio.wait_for(on_a.read(), 5)).notify.task.version == applied.version
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(on_a.read(), 0.5)

            with psycopg.connect(database_url) as conn:
                rows = conn.execute("SELECT device_id, version, state FROM deliveries ORDER BY device_id").fetchall()
            assert rows == [("phone-a", 1, "notified"), ("phone-b", 1, "notified")]
            assert (await _stats(b.address)).remote_changes == 1
            assert (await _stats(a.address)).remote_changes == 0

            # Deleting through A revokes on B.
            assert await client.delete_release("ns/task")
            assert (await asyncio.wait_for(on_b.read(), 5)).revoke.release == "ns/task"
    finally:
        for ch in channels:
            await ch.close()
        await a.stop(grace=0.1)
        await b.stop(grace=0.1)


async def test_a_replica_that_lost_its_listen_connection_catches_up(scale_config, tmp_path, database_url):
    a = await start_controller(scale_config)
    b = await start_controller(scale_config)
    ch_b = None
    try:
        ch_b, on_b = await _device(b.address, "phone-b")
        assert b.listener is not None
        # The listener's session dies (a database failover, a network blip): notifications sent
        # meanwhile are lost to it.
        with psycopg.connect(database_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (b.listener.application_name,),
            ).fetchall()
        assert killed == [(True,)]
        async with AdminClient(a.address, token=ADMIN_TOKEN) as client:
            digest = await _publish(client, tmp_path, "v1")
            await client.apply_release(release="ns/task", manifest_digest=digest, target=ANDROID)
        # On reconnect it re-reads the releases and fans out what changed.
        event = await asyncio.wait_for(on_b.read(), 10)
        assert event.notify.task.release == "ns/task"
    finally:
        if ch_b is not None:
            await ch_b.close()
        await a.stop(grace=0.1)
        await b.stop(grace=0.1)


def test_with_origin_keeps_existing_options():
    conninfo = replicas.with_origin("host=db dbname=t options='-c statement_timeout=5000'", "r-1")
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    assert params["options"] == "-c statement_timeout=5000 -c tether.origin=r-1"
    assert params["host"] == "db"
