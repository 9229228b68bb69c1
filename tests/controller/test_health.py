"""grpc.health.v1.Health on the controller: what the chart's kubelet `grpc:` probes and load balancers ask."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from controller_support import running_controller, start_controller
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_tls import self_signed

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_the_main_port_answers_health_checks_without_a_token(controller_config, enqueuer):
    async with (
        running_controller(controller_config, enqueuer=enqueuer, grace=0.2) as running,
        grpc.aio.insecure_channel(running.address) as channel,
    ):
        assert await check(channel) == SERVING
        assert await check(channel, "tether.v1.DeviceService") == SERVING
        assert await check(channel, "tether.v1.AdminService") == SERVING
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_tls_controller_serves_health_in_plaintext_on_its_health_port(controller_config, enqueuer, tmp_path):
    cert, key, _ = self_signed(tmp_path)
    cfg = dataclasses.replace(controller_config, tls_cert_file=cert, tls_key_file=key, health_port=0)
    async with running_controller(cfg, enqueuer=enqueuer, grace=0.2) as running:
        assert running.health_port and running.health_port != running.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            assert await check(channel) == SERVING
            # Only Health is there: the admin API stays behind TLS on the main port.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await channel.unary_unary("/tether.v1.AdminService/ListReleases")(b"", timeout=3)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            # Stopping: the watcher hears NOT_SERVING before the port closes.
            stop_task = asyncio.ensure_future(running.stop(grace=0.2))
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            await stop_task


SERVICES = [
    "",
    "tether.v1.DeviceService",
    "tether.v1.AdminService",
    "tether.v1.StatsService",
    "tether.v1.TunnelService",
]


async def test_health_answers_serving_without_credentials_and_not_serving_on_stop(controller_config) -> None:
    running = await start_controller(controller_config)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in SERVICES:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Check(health_pb2.HealthCheckRequest(service="tether.v1.NoSuchService"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(watch.read(), 5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(running.stop(grace=2.0))
            # A watcher (a load balancer) hears NOT_SERVING as the controller starts to stop.
            after = await asyncio.wait_for(watch.read(), 5)
            assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping
    finally:
        await running.stop(grace=0)
