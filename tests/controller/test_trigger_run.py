"""On-demand runs: AdminService.TriggerRun pushes RunNow to the connected devices a release targets."""

from __future__ import annotations

import asyncio
import json

import pytest
from controller_helpers import enroll, make_bundle

from tether.common import errors
from tether.proto.v1 import tether_pb2 as pb


async def next_event(stream, timeout: float = 5.0) -> pb.ServerEvent:
    return await asyncio.wait_for(stream.read(), timeout)


async def test_trigger_run_reaches_targeted_connected_devices_only(admin_client, devices_stub, tmp_path):
    directory, bundle = make_bundle(tmp_path / "b")
    upload = await admin_client.upload_bundle(directory, bundle)
    await admin_client.apply_release(
        release="ns/train", manifest_digest=upload.digest, generation=1, target={"matchLabels": {"os": "android"}}
    )
    streams = {}
    for device, os_ in (("phone-1", "android"), ("phone-2", "ios")):
        md = await enroll(devices_stub, device, {"os": os_})
        streams[device] = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
        assert (await next_event(streams[device])).WhichOneof("event") == "sync"

    result = await admin_client.trigger_run("ns/train", payload={"epochs": 2}, request_id="round-7")
    assert (result.request_id, result.version, result.devices) == ("round-7", 1, 1)
    event = await next_event(streams["phone-1"])
    assert event.WhichOneof("event") == "run"
    assert (event.run.release, event.run.version, event.run.request_id) == ("ns/train", 1, "round-7")
    assert json.loads(event.run.payload_json) == {"epochs": 2}
    with pytest.raises(asyncio.TimeoutError):
        await next_event(streams["phone-2"], timeout=0.3)

    generated = await admin_client.trigger_run("ns/train")
    assert len(generated.request_id) == 32 and generated.devices == 1
    for stream in streams.values():
        stream.cancel()


async def test_bad_trigger_run_requests_are_refused(admin_client, tmp_path):
    with pytest.raises(errors.NotFound):
        await admin_client.trigger_run("ns/nothing")
    with pytest.raises(errors.InvalidArgument):
        await admin_client.trigger_run("Not A Release")
    directory, bundle = make_bundle(tmp_path / "b")
    upload = await admin_client.upload_bundle(directory, bundle)
    await admin_client.apply_release(release="ns/t", manifest_digest=upload.digest, generation=1, target={})
    with pytest.raises(errors.InvalidArgument):
        await admin_client.trigger_run("ns/t", request_id="spaces are not allowed")
    await admin_client.apply_release(
        release="ns/t", manifest_digest=upload.digest, generation=1, target={}, paused=True
    )
    with pytest.raises(errors.FailedPrecondition, match="paused"):
        await admin_client.trigger_run("ns/t")
