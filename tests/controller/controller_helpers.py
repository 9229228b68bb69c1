"""Helpers shared by the controller tests (imported as a top-level module: tests have no packages)."""

from __future__ import annotations

import os
import pathlib

import psycopg
from controller_support import BOOTSTRAP_TOKEN, TABLES

from tether.common import auth, manifest
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


def make_bundle(root: pathlib.Path, *, name: str = "demo-task", files: dict[str, bytes] | None = None):
    """A task directory on disk and its manifest."""
    files = files or {
        "task.py": b"def run(ctx):\n    return {'sample_count': 1}\n",
        "model.bin": os.urandom(700_000),  # several 256 KiB chunks
        "data/labels.txt": b"a\nb\n",
    }
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root, manifest.hash_directory(root, name=name, entrypoint="task.py")


async def enroll(
    stub: pb_grpc.DeviceServiceStub,
    device_id: str,
    attributes: dict[str, str] | None = None,
    backends: tuple[str, ...] = ("mnn/cpu",),
) -> tuple[tuple[str, str], ...]:
    """Enrol a device; return the call metadata carrying its credential."""
    response = await stub.Enroll(
        pb.EnrollRequest(
            bootstrap_token=BOOTSTRAP_TOKEN,
            device=pb.DeviceInfo(device_id=device_id, attributes=attributes or {}, backends=list(backends)),
        )
    )
    assert response.device_id == device_id
    return auth.bearer_metadata(response.credential)


def table_counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # type: ignore[index]
