"""Defect class 6 (issue 14): a report lost at a disconnect is made good; delivery state is level-triggered.

Before the fix a device that disconnected while its INSTALLED report was in
flight stayed `notified` on the controller for good: the agent sent what it
had installed when it reconnected (`SubscribeRequest.installed`) and the
controller ignored it, and the agent never sent the report again. Under churn
the installed counts (which gates and status read) stayed short. Now the
controller settles a delivery from what the device says it holds on every
(re)connection (only `notified`/`downloading` rows at exactly the served
version and digest move), and the agent retries a terminal report until it is
acknowledged.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys

import grpc
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "controller"))
from controller_helpers import enroll, make_bundle

from tether.agent import client, reporting
from tether.controller import deliveries
from tether.proto.v1 import tether_pb2 as pb

S = pb.DeliveryState


async def _first(stream) -> pb.ServerEvent:
    return await asyncio.wait_for(stream.read(), 10)


async def test_a_device_that_reconnects_holding_the_version_is_counted_installed(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "phone-1", {"os": "android"})
    directory, bundle = make_bundle(tmp_path / "b", files={"task.py": b"def run(ctx):\n    return {}\n"})
    await admin_client.upload_bundle(directory, bundle)
    applied = await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest, generation=1)

    first = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    (task,) = (await _first(first)).sync.desired
    first.cancel()  # installed meanwhile; the INSTALLED report was lost with the connection
    status = await admin_client.get_release_status("ns/task")
    assert status.installed == 0

    held = pb.DesiredTask(release="ns/task", version=applied.version, manifest_digest=bundle.digest)
    wrong = pb.DesiredTask(release="ns/other", version=1, manifest_digest=bundle.digest)
    again = devices_stub.Subscribe(pb.SubscribeRequest(installed=[held, wrong]), metadata=md)
    await _first(again)
    status = await admin_client.get_release_status("ns/task")
    assert status.installed == 1

    # Level-triggered, never backwards: a later terminal report is not undone by the next reconnection.
    await devices_stub.ReportStatus(
        pb.ReportStatusRequest(release="ns/task", version=applied.version, state=S.DELIVERY_STATE_SUCCEEDED),
        metadata=md,
    )
    again.cancel()
    third = devices_stub.Subscribe(pb.SubscribeRequest(installed=[held]), metadata=md)
    await _first(third)
    third.cancel()
    status = await admin_client.get_release_status("ns/task")
    assert status.succeeded == 1  # still succeeded, not moved back to installed
    assert task.version == applied.version


def test_only_the_served_version_and_digest_settle_a_delivery():
    desired = [("ns/a", 2, "sha256:" + "a" * 64), ("ns/b", 1, "sha256:" + "b" * 64)]
    a, c = "sha256:" + "a" * 64, "sha256:" + "c" * 64
    installed = [("ns/a", 1, a), ("ns/b", 1, c), ("ns/a", 2, a)]
    assert deliveries.confirmed_installs(installed, desired) == [("ns/a", 2)]


class _Flaky:
    """A DeviceClient whose first `failures` ReportStatus calls fail as a dropped connection does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.acked: list[tuple[str, int, int]] = []
        self.url_failures: list[dict[str, int]] = []  # what each acknowledged report carried

    async def report_status(self, *, release, version, state, message, device_state, url_failures=None) -> None:
        if self.failures:
            self.failures -= 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
        self.acked.append((release, version, state))
        self.url_failures.append(dict(url_failures or {}))


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_terminal_report_is_retried_until_acknowledged():
    device = _Flaky(failures=3)
    reporter = reporting.Reporter(device=device, backoff=client.Backoff(initial_s=0.01, max_s=0.05))
    task = pb.DesiredTask(release="ns/t", version=4)
    await reporter.status(task, S.DELIVERY_STATE_INSTALLED)
    await _until(lambda: device.acked == [("ns/t", 4, S.DELIVERY_STATE_INSTALLED)])
    assert reporter.unacked == {}
    retry = reporter.cancel()
    if retry is not None:
        await asyncio.gather(retry, return_exceptions=True)


async def test_a_newer_report_supersedes_and_progress_reports_are_not_retried():
    device = _Flaky(failures=1)
    reporter = reporting.Reporter(device=device, backoff=client.Backoff(initial_s=5, max_s=5))
    await reporter.status(pb.DesiredTask(release="ns/t", version=1), S.DELIVERY_STATE_DOWNLOADING)
    assert reporter.unacked == {}  # progress: lost is fine
    device.failures = 1
    await reporter.status(pb.DesiredTask(release="ns/t", version=1), S.DELIVERY_STATE_FAILED, "boom")
    assert list(reporter.unacked) == ["ns/t"]
    await reporter.status(pb.DesiredTask(release="ns/t", version=2), S.DELIVERY_STATE_INSTALLED)
    assert reporter.unacked == {} and device.acked == [("ns/t", 2, S.DELIVERY_STATE_INSTALLED)]
    reporter.connected()  # nothing to resend
    retry = reporter.cancel()
    if retry is not None:
        await asyncio.gather(retry, return_exceptions=True)
    assert device.acked == [("ns/t", 2, S.DELIVERY_STATE_INSTALLED)]


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT])
async def test_a_report_refused_for_good_is_not_retried(code):
    class Refusing(_Flaky):
        async def report_status(self, **kwargs) -> None:
            self.failures += 1
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")

    device = Refusing(0)
    reporter = reporting.Reporter(device=device, backoff=client.Backoff(initial_s=0.01, max_s=0.01))
    await reporter.status(pb.DesiredTask(release="ns/t", version=1), S.DELIVERY_STATE_INSTALLED)
    assert reporter.unacked == {} and device.failures == 1


async def test_url_failures_are_told_once_with_the_first_acknowledged_report():
    device = _Flaky(failures=1)
    reporter = reporting.Reporter(device=device, backoff=client.Backoff(initial_s=5, max_s=5))
    task = pb.DesiredTask(release="ns/t", version=1)
    reporter.note_url_failure("ns/t", "expired")
    reporter.note_url_failure("ns/t", "expired")
    reporter.note_url_failure("ns/other", "stalled")
    await reporter.status(task, S.DELIVERY_STATE_DOWNLOADING)  # lost: the failures stay
    assert reporter.url_failures["ns/t"] == {"expired": 2}
    await reporter.status(task, S.DELIVERY_STATE_INSTALLED)
    assert device.url_failures == [{"expired": 2}]
    assert "ns/t" not in reporter.url_failures and reporter.url_failures["ns/other"] == {"stalled": 1}
    await reporter.status(task, S.DELIVERY_STATE_SUCCEEDED)
    assert device.url_failures == [{"expired": 2}, {}]  # not told twice
    retry = reporter.cancel()
    if retry is not None:
        await asyncio.gather(retry, return_exceptions=True)
