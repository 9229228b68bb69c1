"""Fixtures of the security tests: a real controller on loopback (plaintext, TLS or mTLS) over a fresh database."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from sec_helpers import ADMIN_TOKEN, BOOTSTRAP_TOKEN, RecordingEnqueuer

from tether.common import admin, certs, config
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

pytest.importorskip("tether.controller.server")


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
        grace_s=0.2,
        pool_max_size=5,
        max_blob_bytes=8 * 1024 * 1024,
    )


@pytest.fixture()
async def start(enqueuer: RecordingEnqueuer) -> AsyncIterator[Callable]:
    """`await start(cfg, **changes)`: a controller with `cfg` changed so, stopped after the test."""
    from tether.controller import server

    running: list[server.RunningController] = []

    async def starter(cfg: config.ControllerConfig, *, blob_store=None, **changes):
        r = await server.start_controller(dataclasses.replace(cfg, **changes), enqueuer=enqueuer, blob_store=blob_store)
        running.append(r)
        return r

    yield starter
    for r in running:
        await r.stop(grace=0.2)


@pytest.fixture()
async def controller(controller_config, start):
    return await start(controller_config, auth_cache_s=0.3)


@pytest.fixture()
async def admin_client(controller) -> AsyncIterator[admin.AdminClient]:
    async with admin.AdminClient(target=controller.address, token=ADMIN_TOKEN) as client:
        yield client


@pytest.fixture()
async def devices_stub(controller) -> AsyncIterator[pb_grpc.DeviceServiceStub]:
    async with grpc.aio.insecure_channel(controller.address) as ch:
        yield pb_grpc.DeviceServiceStub(ch)


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory) -> pathlib.Path:
    """A CA with a server certificate for the loopback names, and a client certificate `device-1`."""
    d = tmp_path_factory.mktemp("ca")
    certs.init_ca_dir(d, hosts=("localhost", "127.0.0.1"))
    certs.issue_client(d, "device-1")
    return d


@pytest.fixture(scope="session")
def other_ca_dir(tmp_path_factory) -> pathlib.Path:
    """An unrelated CA (its certificates must be refused by the first one's controller)."""
    d = tmp_path_factory.mktemp("other-ca")
    certs.init_ca_dir(d, hosts=("localhost", "127.0.0.1"))
    certs.issue_client(d, "intruder")
    return d
