"""Fixtures for the controller data plane: a real controller on 127.0.0.1:0 over a fresh database."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest
from controller_helpers import ADMIN_TOKEN, BOOTSTRAP_TOKEN, RecordingEnqueuer

from tether.common import admin, config
from tether.controller import db, server, store
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


@pytest.fixture()
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


@pytest.fixture()
def controller_config(database_url: str, tmp_path: pathlib.Path) -> config.ControllerConfig:
    return config.ControllerConfig(
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        bootstrap_token=BOOTSTRAP_TOKEN,
        listen="127.0.0.1:0",
        blob_dir=tmp_path / "blobs",
        grace_s=0.5,
        pool_max_size=5,
        max_blob_bytes=8 * 1024 * 1024,
    )


@pytest.fixture()
async def controller(
    controller_config: config.ControllerConfig, enqueuer: RecordingEnqueuer
) -> AsyncIterator[server.RunningController]:
    running = await server.start_controller(controller_config, enqueuer=enqueuer)
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture()
async def admin_client(controller: server.RunningController) -> AsyncIterator[admin.AdminClient]:
    async with admin.AdminClient(target=controller.address, token=ADMIN_TOKEN) as client:
        yield client


@pytest.fixture()
async def channel(controller: server.RunningController) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(controller.address) as ch:
        yield ch


@pytest.fixture()
def devices_stub(channel: grpc.aio.Channel) -> pb_grpc.DeviceServiceStub:
    return pb_grpc.DeviceServiceStub(channel)


@pytest.fixture()
async def pg_store(database_url: str) -> AsyncIterator[store.Store]:
    db.migrate(database_url)
    pool = await db.open_pool(database_url, max_size=4)
    try:
        yield store.Store(pool)
    finally:
        await pool.close()
