import json

import grpc
import pytest

from tether.common import errors
from tether.controller import hub, releases, targeting
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import selectors

DIGEST = "sha256:" + "c" * 64


def release(version=1, target=None, paused=False):
    s = releases.parse_spec(
        release="ns/t",
        generation=1,
        manifest_digest=DIGEST,
        target_json=json.dumps(target or {}),
        trigger_json="",
        aggregation_json="",
        paused=paused,
    )
    return releases.Release(spec=s, version=version, target=selectors.parse_target(s.target))


def facts(device_id, **attributes):
    return targeting.device_facts(device_id=device_id, attributes=attributes)


def heartbeat(n):
    return pb.ServerEvent(heartbeat=pb.Heartbeat(server_time_ms=n))


async def test_notify_reaches_targeted_connected_devices_only():
    h = hub.Hub(queue_size=4)
    a = h.connect(device_id="a", facts=facts("a", os="android"))
    i = h.connect(device_id="i", facts=facts("i", os="ios"))
    fan = h.release_changed(before=None, after=release(target={"matchLabels": {"os": "android"}}))
    assert fan.notified == ("a",)
    event = a.queue.get_nowait()
    assert event.notify.task == pb.DesiredTask(release="ns/t", version=1, manifest_digest=DIGEST)
    assert i.queue.empty()
    fan = h.release_changed(before=release(target={"matchLabels": {"os": "android"}}), after=None)
    assert fan.revoked == ("a",)
    assert a.queue.get_nowait().revoke.release == "ns/t"


async def test_a_slow_device_is_dropped_without_blocking_others():
    h = hub.Hub(queue_size=2)
    slow = h.connect(device_id="slow", facts=facts("slow"))
    fast = h.connect(device_id="fast", facts=facts("fast"))
    for v in range(1, 4):
        fan = h.release_changed(before=release(v - 1) if v > 1 else None, after=release(v))
        fast.queue.get_nowait()  # the fast one keeps up
    assert fan.dropped == ("slow",)
    assert fan.notified == ("fast",)
    assert not h.is_connected("slow")
    assert h.is_connected("fast")
    # The slow stream finds only the closing sentinel: its backlog is useless, Sync replaces it.
    closed = slow.queue.get_nowait()
    assert isinstance(closed, hub.Closed)
    assert closed.code == grpc.StatusCode.UNAVAILABLE
    assert slow.queue.empty()
    assert not h.offer(slow, heartbeat(1))


async def test_reconnect_supersedes_the_old_stream():
    h = hub.Hub()
    old = h.connect(device_id="d", facts=facts("d"))
    new = h.connect(device_id="d", facts=facts("d"))
    assert isinstance(old.queue.get_nowait(), hub.Closed)
    h.disconnect(old)  # the old stream's `finally` must not unregister the new one
    assert h.is_connected("d")
    assert h.offer(new, heartbeat(1))
    h.disconnect(new)
    assert len(h) == 0


async def test_update_facts_and_connected_count():
    h = hub.Hub()
    h.connect(device_id="d", facts=facts("d", os="ios"))
    r = release(target={"matchLabels": {"os": "android"}})
    assert h.connected_targeted(r) == 0
    h.update_facts(device_id="d", facts=facts("d", os="android"))
    assert h.connected_targeted(r) == 1


async def test_close_all():
    h = hub.Hub()
    conns = [h.connect(device_id=f"d{i}", facts=facts(f"d{i}")) for i in range(3)]
    h.close_all(reason="bye")
    assert len(h) == 0
    assert all(isinstance(c.queue.get_nowait(), hub.Closed) for c in conns)


def test_queue_size_must_be_positive():
    with pytest.raises(errors.InvalidArgument):
        hub.Hub(queue_size=0)


async def test_a_late_fanout_of_an_older_version_is_skipped():
    h = hub.Hub()
    conn = h.connect(device_id="d", facts=facts("d"))
    assert h.release_changed(before=release(1), after=release(3)).notified == ("d",)
    assert h.release_changed(before=release(1), after=release(2)).notified == ()
    assert conn.queue.get_nowait().notify.task.version == 3
    assert conn.queue.empty()
