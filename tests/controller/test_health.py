"""The standard gRPC health service on the controller: SERVING while up, NOT_SERVING once stopping, no token needed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from controller_support import start_controller
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ["", "tether.v1.DeviceService", "tether.v1.AdminService", "tether.v1.StatsService"]


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
