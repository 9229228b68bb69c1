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
