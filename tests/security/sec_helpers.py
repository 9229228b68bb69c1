"""Helpers of the security tests (a top-level module: tests have no packages)."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import numpy as np
import psycopg
import pytest
from controller_support import BOOTSTRAP_TOKEN

from tether.common import auth, bundle_files
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

SIMPLE_TASK = "def run(ctx):\n    return {'sample_count': 3, 'metrics': {'m': 1.0}}\n"


def write_bundle(root: pathlib.Path, source: str = SIMPLE_TASK, *, name: str = "sec-task", extra=None):
    """A bundle directory without an engine (task.py + bundle.yaml) and its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(source)
    (root / "bundle.yaml").write_text(f"name: {name}\nentrypoint: task.py\n")
    for rel, data in (extra or {}).items():
        (root / rel).write_bytes(data)
    return root, bundle_files.build_manifest(root)


async def enroll(stub: pb_grpc.DeviceServiceStub, device_id: str, attributes=None) -> pb.EnrollResponse:
    return await stub.Enroll(
        pb.EnrollRequest(
            bootstrap_token=BOOTSTRAP_TOKEN,
            device=pb.DeviceInfo(device_id=device_id, attributes=attributes or {}, backends=["mnn/cpu"]),
        )
    )


def md(token: str) -> tuple[tuple[str, str], ...]:
    return auth.bearer_metadata(token)


def upload_request(*, release: str, version: int = 1, key: str = "run-1", samples: int = 4) -> pb.UploadResultRequest:
    return pb.UploadResultRequest(
        release=release,
        version=version,
        idempotency_key=key,
        sample_count=samples,
        metrics={"accuracy": 0.5},
        tensors=[pb.Tensor(name="w", shape=[2], data=np.array([1.0, 2.0], dtype="<f8").tobytes())],
        duration_s=0.1,
    )


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def drain(stream) -> list:
    return [m async for m in stream]


async def first_event(stream, timeout: float = 5.0) -> pb.ServerEvent:
    return await asyncio.wait_for(stream.read(), timeout)


def query(database_url: str, sql: str, *args) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, args).fetchall()


async def until(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
