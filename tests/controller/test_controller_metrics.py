"""The controller's Prometheus metrics, scraped over HTTP from a real controller while agents install."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import urllib.error

import grpc
import pytest
from controller_helpers import enroll, make_bundle
from controller_support import running_controller
from metrics_support import scrape, scrape_sync, value

from tether.common import exposition
from tether.controller import admission, instruments
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

FILES = {"task.py": b"def run(ctx):\n    return {'sample_count': 1}\n", "model.bin": os.urandom(600_000)}


async def test_values_move_as_an_agent_installs(controller_config, enqueuer, tmp_path):
    cfg = dataclasses.replace(controller_config, metrics_port=0, metrics_host="127.0.0.1")
    async with running_controller(cfg, enqueuer=enqueuer) as running:
        assert running.metrics_server is not None
        url = running.metrics_server.url
        before = await scrape(url)
        assert value(before, "tether_controller_connected_agents") == 0
        assert value(before, "process_resident_memory_bytes") > 0

        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.DeviceServiceStub(channel)
            md = await enroll(stub, "phone-1", {"os": "android"})
            stream = stub.Subscribe(pb.SubscribeRequest(), metadata=md)
            assert (await asyncio.wait_for(stream.read(), 5)).WhichOneof("event") == "sync"
            assert value(await scrape(url), "tether_controller_connected_agents") == 1

            from tether.common.admin_client import AdminClient

            async with AdminClient(target=running.address, token=cfg.admin_token) as admin:
                directory, bundle = make_bundle(tmp_path / "bundle", files=FILES)
                await admin.upload_bundle(directory, bundle)
                await admin.apply_release(release="ns/task", manifest_digest=bundle.digest, target={})
            assert (await asyncio.wait_for(stream.read(), 5)).WhichOneof("event") == "notify"

            blobs = [pb.BlobRange(digest=f.sha256, offset=0) for f in bundle.files]
            served = 0
            async for chunk in stub.PullBlobs(pb.PullBlobsRequest(release="ns/task", blobs=blobs), metadata=md):
                served += len(chunk.data)
            await stub.ReportStatus(
                pb.ReportStatusRequest(release="ns/task", version=1, state=pb.DELIVERY_STATE_INSTALLED), metadata=md
            )
            await stub.ReportStatus(
                pb.ReportStatusRequest(release="ns/task", version=1, state=pb.DELIVERY_STATE_FAILED, message="x"),
                metadata=md,
            )
            after = await scrape(url)
            stream.cancel()

        assert served == sum(len((directory / f.path).read_bytes()) for f in bundle.files)
        assert value(after, "tether_controller_notifies_total", kind="notify") == 1
        assert value(after, "tether_controller_pulls_total", method="PullBlobs") == 1
        assert value(after, "tether_controller_blob_bytes_served_total") == served
        assert value(after, "tether_controller_delivery_reports_total", state="installed") == 1
        assert value(after, "tether_controller_delivery_reports_total", state="failed") == 1
        report = "/tether.v1.DeviceService/ReportStatus"
        assert value(after, "tether_controller_rpc_duration_seconds_count", method=report) == 2
        assert value(after, "tether_controller_rpc_duration_seconds_sum", method=report) > 0
        assert (
            value(after, "tether_controller_rpc_duration_seconds_count", method="/tether.v1.DeviceService/PullBlobs")
            == 1
        )
        # A stream held for a device's lifetime is not a latency.
        assert (
            "tether_controller_rpc_duration_seconds_count",
            (("method", "/tether.v1.DeviceService/Subscribe"),),
        ) not in after
        assert value(after, "tether_controller_pull_queue_depth") == 0


async def test_admission_queue_depth_is_read_at_scrape_time():
    metrics = instruments.ControllerMetrics()
    gate = admission.FifoGate(1)
    metrics.watch(connected=lambda: 3, queued=lambda: gate.queued, active=lambda: gate.active)
    server = exposition.serve(metrics.registry, port=0, host="127.0.0.1")
    try:
        await gate.acquire()
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        samples = await scrape(server.url)
        assert value(samples, "tether_controller_pull_queue_depth") == 2
        assert value(samples, "tether_controller_pulls_in_progress") == 1
        assert value(samples, "tether_controller_connected_agents") == 3
        for _ in waiters:
            gate.release()
        await asyncio.gather(*waiters)
        gate.release()
        assert value(await scrape(server.url), "tether_controller_pull_queue_depth") == 0
    finally:
        server.stop()


def test_a_failing_gauge_reads_nan_and_the_scrape_still_answers():
    metrics = instruments.ControllerMetrics()

    def gone() -> float:
        raise RuntimeError("hub closed")

    metrics.watch(connected=gone, queued=lambda: 0, active=lambda: 0)
    server = exposition.serve(metrics.registry, port=0, host="127.0.0.1")
    try:
        with pytest.raises(AssertionError, match="NaN"):
            value(scrape_sync(server.url), "tether_controller_connected_agents")
    finally:
        server.stop()
        server.stop()  # idempotent


async def test_scrapes_during_shutdown_never_crash_it(controller_config, enqueuer):
    cfg = dataclasses.replace(controller_config, metrics_port=0, metrics_host="127.0.0.1")
    running = await running_controller(cfg, enqueuer=enqueuer).__aenter__()
    url = running.metrics_server.url
    outcomes: list[str] = []
    done = threading.Event()

    def scraper() -> None:
        while not done.is_set():
            try:
                scrape_sync(url, timeout=30)
                outcomes.append("ok")
            except (urllib.error.URLError, ConnectionError, OSError):
                outcomes.append("refused")

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        # Stop only once a scrape has answered: on a loaded machine the first one can be slow,
        # and stopping before it answers would prove nothing about scrapes during shutdown.
        deadline = time.monotonic() + 60
        while "ok" not in outcomes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await running.stop(grace=0.2)  # raises nothing while scrapes keep coming
    finally:
        done.set()
        thread.join(timeout=10)
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "refused"}
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        scrape_sync(url, timeout=2)  # the port is released


def test_a_taken_port_is_a_clear_error():
    server = exposition.serve(instruments.ControllerMetrics().registry, port=0, host="127.0.0.1")
    try:
        from tether.common import errors

        with pytest.raises(errors.FailedPrecondition, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            exposition.serve(instruments.ControllerMetrics().registry, port=server.port, host="127.0.0.1")
    finally:
        server.stop()
