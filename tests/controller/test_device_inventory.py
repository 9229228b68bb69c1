"""ListDevices and `tether device list`: the inventory, a bounded page at a time."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc
import pytest
from controller_helpers import enroll
from controller_support import ADMIN_TOKEN

from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


async def test_pages_cover_the_fleet_once_in_device_id_order(admin_client, devices_stub, channel):
    ids = [f"dev-{i:02d}" for i in range(7)]
    for i, device_id in enumerate(reversed(ids)):
        await enroll(devices_stub, device_id, {"site": "a" if i % 2 else "b"}, backends=("mnn/cpu", "ort/cpu"))
    await admin_client.revoke_device("dev-03")

    admin = pb_grpc.AdminServiceStub(channel)
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    seen, token, pages = [], "", 0
    while True:
        page = await admin.ListDevices(pb.ListDevicesRequest(page_size=2, page_token=token), metadata=md)
        assert len(page.devices) <= 2
        seen += [d.device_id for d in page.devices]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [i for i in ids if i != "dev-03"] and pages == 3

    everything = await admin_client.list_devices(page_size=3, include_revoked=True)
    assert [d.device_id for d in everything] == ids
    revoked = next(d for d in everything if d.device_id == "dev-03")
    assert revoked.revoked and revoked.backends == ("mnn/cpu", "ort/cpu")
    assert everything[0].labels in ({"site": "a"}, {"site": "b"}) and everything[0].last_seen_unix
    assert [d.device_id for d in await admin_client.list_devices(limit=2)] == ids[:2]


@pytest.mark.parametrize(
    ("request_", "words"),
    [(pb.ListDevicesRequest(page_size=5000), "page_size"), (pb.ListDevicesRequest(page_token="bad id!"), "device")],
)
async def test_bad_requests_are_named(channel, request_, words):
    admin = pb_grpc.AdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin.ListDevices(request_, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()


async def test_an_admin_token_is_required(channel):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await pb_grpc.AdminServiceStub(channel).ListDevices(pb.ListDevicesRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_cli_lists_labels_backends_and_last_seen(controller, devices_stub):
    await enroll(devices_stub, "phone-1", {"os": "android", "tier": "beta"})
    await enroll(devices_stub, "phone-2", {"os": "ios"})

    async def tether(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tether.cli.main", "device", "list", "--controller", controller.address, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "TETHER_ADMIN_TOKEN": ADMIN_TOKEN},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    table = await tether()
    assert "phone-1" in table and "os=android,tier=beta" in table and "mnn/cpu" in table and "2 device(s)" in table
    docs = json.loads(await tether("-o", "json", "--limit", "1"))
    assert [d["device_id"] for d in docs] == ["phone-1"] and docs[0]["labels"] == {"os": "android", "tier": "beta"}


# ---------------------------------------------------------------- the connected replica


async def connected_to(admin_client, device_id: str) -> str:
    [entry] = [d for d in await admin_client.list_devices() if d.device_id == device_id]
    return entry.connected_replica


async def test_the_replica_holding_a_stream_is_listed_until_the_stream_ends(controller, admin_client, devices_stub):
    md = await enroll(devices_stub, "phone-1", {"os": "android"})
    await enroll(devices_stub, "phone-2", {"os": "ios"})
    assert controller.replica_id
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    first = await stream.read()
    assert first.WhichOneof("event") == "sync"
    assert await connected_to(admin_client, "phone-1") == controller.replica_id
    assert await connected_to(admin_client, "phone-2") == ""  # enrolled, never connected

    stream.cancel()
    deadline = asyncio.get_running_loop().time() + 30
    while await connected_to(admin_client, "phone-1") and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert await connected_to(admin_client, "phone-1") == ""


async def test_a_stream_that_moved_to_another_replica_is_not_cleared_by_the_old_one(storage, request):
    """Device a reconnects to r2 before r1 notices its old stream ended: r1's cleanup must not clear r2."""
    from tether.controller import devices
    from tether.controller.storage import memory

    await storage.devices.enroll_device(device_id="a", info=devices.validate_info(attributes={}, backends=[]))
    sessions = []
    if not isinstance(storage.devices, memory.MemoryDevices):  # Postgres shows a replica only while it is alive
        import psycopg

        url = request.getfixturevalue("database_url")
        for replica in ("r1", "r2"):
            sessions.append(await psycopg.AsyncConnection.connect(
                url, application_name=devices.listener_application_name(replica), autocommit=True
            ))  # fmt: skip
    try:

        async def replica() -> str:
            [entry] = await storage.devices.list_devices(limit=10)
            return entry.connected_replica

        await storage.devices.device_connected("a", "r1")
        assert await replica() == "r1"
        await storage.devices.device_connected("a", "r2")
        await storage.devices.device_disconnected("a", "r1")  # late cleanup of the old stream
        assert await replica() == "r2"
        await storage.devices.device_disconnected("a", "r2")
        assert await replica() == ""
        await storage.devices.device_disconnected("a", "nobody")  # unknown replica, unknown device: no-ops
        await storage.devices.device_connected("ghost", "r1")
        if sessions:  # r1 dies without cleaning up: its devices are not shown as connected
            await storage.devices.device_connected("a", "r1")
            assert await replica() == "r1"
            await sessions.pop(0).close()
            assert await replica() == ""
    finally:
        for s in sessions:
            await s.close()
