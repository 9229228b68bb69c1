"""A killed controller loses no accepted update, and a redelivered aggregation counts nothing twice (Postgres).

Given a round with two selected devices, when one update is accepted by a controller that is then stopped, and
the other by a new controller on the same database and blob store, then the round holds both and aggregates
them; an aggregation that dies before its commit leaves the round Aggregating, and running it again (the
redelivered message) publishes the same model bit for bit; running it a third time changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import numpy as np
import psycopg
from controller_helpers import enroll

from tether.common import admin_client, manifest, tensorfiles
from tether.controller import blobs, round_tasks
from tether.controller.fl import publishing, rounds
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.spec import federation

TASK = "ml/restart"
MODEL = {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
FEDERATED = {"rounds": 2, "participants": {"count": 2}, "quorum": {"count": 2}, "roundDeadlineSeconds": 3600}
ADMIN = "admin-token-for-tests"


def update_for(value: float) -> bytes:
    return tensorfiles.encode_update({n: np.full(a.shape, value) for n, a in MODEL.items()}, encoding="float32")


async def push(address: str, device: str, data: bytes, samples: int) -> pb.PushUpdateResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.DeviceServiceStub(ch)
        creds = await enroll(stub, device)
        header = pb.UpdateHeader(
            release=TASK,
            round=1,
            version=1,
            sample_count=samples,
            encoding="float32",
            size=len(data),
            sha256="sha256:" + hashlib.sha256(data).hexdigest(),
        )
        return await stub.PushUpdate(iter([pb.PushUpdateChunk(header=header, data=data)]), metadata=creds)


async def test_accepted_updates_survive_a_restart_and_aggregation_is_redelivered_without_double_counting(
    start, controller_config, tmp_path, database_url, monkeypatch
) -> None:
    first = await start(controller_config)
    root = tmp_path / "task"
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 1}\n")
    model_bytes = tensorfiles.dump(MODEL)
    (root / "model.safetensors").write_bytes(model_bytes)
    body = manifest.hash_directory(root, name="restart", entrypoint="task.py")
    async with admin_client.AdminClient(first.address, token=ADMIN) as admin:
        upload = await admin.upload_bundle(root, body)
        await admin.apply_release(
            release=TASK, manifest_digest=upload.digest, trigger={"type": "onDemand"}, federated=FEDERATED
        )
    rules = federation.parse_federation(FEDERATED)
    assert rules is not None
    r = rounds.open_round(task=TASK, number=1, rules=rules, now=0.0)
    import dataclasses

    r = dataclasses.replace(r, model=manifest.sha256_digest(model_bytes), version=1)
    await first.storage.rounds.create_round(r)
    await first.storage.rounds.update_round(
        rounds.select(r, eligible=["dev-a", "dev-b"], rules=rules, now=1e12), expected=rounds.Phase.OPEN
    )

    assert (await push(first.address, "dev-a", update_for(1.0), samples=1)).accepted
    await first.stop(grace=0)  # the controller goes away right after acknowledging

    second = await start(controller_config)
    kept = await second.storage.rounds.round(task=TASK, number=1)
    assert kept is not None and kept.received == ("dev-a",)
    assert (await push(second.address, "dev-b", update_for(4.0), samples=3)).accepted
    ready = await second.storage.rounds.round(task=TASK, number=1)
    assert ready is not None and ready.phase is rounds.Phase.AGGREGATING

    store = blobs.FilesystemBlobStore(controller_config.blob_dir)
    written: list[str] = []
    real_put = round_tasks._put

    def recording_put(s, data):
        digest = real_put(s, data)
        written.append(digest)
        return digest

    monkeypatch.setattr(round_tasks, "_put", recording_put)

    def crash(records):
        raise RuntimeError("worker killed before its commit")

    def aggregate() -> str:
        with psycopg.connect(database_url) as conn:
            return round_tasks.aggregate_round(conn, store, task=TASK, number=1)

    monkeypatch.setattr(publishing, "device_metrics", crash)
    try:
        await asyncio.to_thread(aggregate)
    except RuntimeError:
        pass
    else:  # pragma: no cover - the crash must happen
        raise AssertionError("the simulated crash did not happen")
    still = await second.storage.rounds.round(task=TASK, number=1)
    assert still is not None and still.phase is rounds.Phase.AGGREGATING  # nothing committed
    assert await second.storage.rounds.round_result(task=TASK, number=1) is None
    crashed_model = written[0]

    monkeypatch.undo()
    assert await asyncio.to_thread(aggregate) == "published"
    result = await second.storage.rounds.round_result(task=TASK, number=1)
    assert result is not None and result.model == crashed_model  # bit for bit the same model
    assert result.samples == 4
    got = tensorfiles.load(store.path_for(result.model).read_bytes())
    for n, a in MODEL.items():  # FedAvg: (1·1 + 3·4) / 4 = 3.25 added to the model, each update counted once
        np.testing.assert_array_equal(got[n], (a.astype(np.float64) + 3.25).astype(np.float32))
    assert await asyncio.to_thread(aggregate) == "already-published"  # redelivered again: nothing changes
    assert await second.storage.rounds.round_result(task=TASK, number=1) == result
