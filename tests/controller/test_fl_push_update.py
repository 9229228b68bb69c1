"""PushUpdate on a real controller (gRPC over loopback, Postgres): every refusal class, named and counted, and
an accepted update kept with its blob."""

from __future__ import annotations

import hashlib
import pathlib

import grpc
import numpy as np
import pytest
from controller_helpers import enroll

from tether.common import manifest, tensorfiles
from tether.controller.fl import rounds
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import federation

TASK = "ml/fl"
MODEL = {"dense/w": np.zeros((4, 3), dtype=np.float32), "dense/b": np.zeros(3, dtype=np.float32)}
FEDERATED = {"rounds": 3, "participants": {"count": 3}, "quorum": {"count": 2}, "roundDeadlineSeconds": 600}


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks(header: pb.UpdateHeader, data: bytes, size: int = 1000):
    yield pb.PushUpdateChunk(header=header, data=data[:size])
    for at in range(size, len(data), size):
        yield pb.PushUpdateChunk(data=data[at : at + size])


def header_for(data: bytes, *, round_number: int = 1, encoding: str = "float32", **over) -> pb.UpdateHeader:
    values = dict(
        release=TASK,
        round=round_number,
        version=1,
        sample_count=10,
        metrics={"loss": 0.5},
        encoding=encoding,
        size=len(data),
        sha256=digest(data),
    )
    values.update(over)
    return pb.UpdateHeader(**values)


async def federated_release(controller, admin_client, tmp_path: pathlib.Path) -> tuple[str, federation.Federation]:
    root = tmp_path / "task"
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 1}\n")
    model_bytes = tensorfiles.dump(MODEL)
    (root / "model.safetensors").write_bytes(model_bytes)
    body = manifest.hash_directory(root, name="fl", entrypoint="task.py")
    upload = await admin_client.upload_bundle(root, body)
    await admin_client.apply_release(
        release=TASK, manifest_digest=upload.digest, trigger={"type": "onDemand"}, federated=FEDERATED
    )
    rules = federation.parse_federation(FEDERATED)
    assert rules is not None
    return digest(model_bytes), rules


async def push(stub, metadata, header, data):
    return await stub.PushUpdate(chunks(header, data), metadata=metadata)


async def test_updates_are_refused_by_class_with_the_reason_named_and_counted(
    controller, admin_client, devices_stub, tmp_path
) -> None:
    model_digest, rules = await federated_release(controller, admin_client, tmp_path)
    creds = {d: await enroll(devices_stub, d) for d in ("dev-a", "dev-b", "dev-c", "dev-x")}
    store = controller.storage.rounds
    r = rounds.open_round(task=TASK, number=1, rules=rules, now=0.0)
    r = rounds.Round(**{**r.__dict__, "model": model_digest, "version": 1})
    await store.create_round(r)
    chosen = rounds.select(r, eligible=["dev-a", "dev-b", "dev-c"], rules=rules, now=1e12)  # deadline far ahead
    await store.update_round(chosen, expected=rounds.Phase.OPEN)

    good = tensorfiles.encode_update({n: np.full(a.shape, 0.5) for n, a in MODEL.items()}, encoding="float32")

    async def refused(device, header, data, code, reason):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await push(devices_stub, creds[device], header, data)
        assert info.value.code() is code, info.value.details()
        assert info.value.details().startswith(reason), info.value.details()
        return info.value.details()

    bad = grpc.StatusCode.INVALID_ARGUMENT
    pre = grpc.StatusCode.FAILED_PRECONDITION
    shape = tensorfiles.encode_update({"dense/w": np.zeros((3, 4)), "dense/b": np.zeros(3)}, encoding="float32")
    assert "dense/w" in await refused("dev-a", header_for(shape), shape, bad, "InvalidUpdate")
    f64 = tensorfiles.dump({n: np.zeros(a.shape) for n, a in MODEL.items()})
    assert "float64" in await refused("dev-a", header_for(f64), f64, bad, "InvalidUpdate")
    nan = tensorfiles.dump({n: np.full(a.shape, np.nan, dtype=np.float32) for n, a in MODEL.items()})
    assert "NaN" in await refused("dev-a", header_for(nan), nan, bad, "InvalidUpdate")
    missing = tensorfiles.encode_update({"dense/w": np.zeros((4, 3))}, encoding="float32")
    assert "missing" in await refused("dev-a", header_for(missing), missing, bad, "InvalidUpdate")
    await refused("dev-a", header_for(good, sha256=digest(b"other")), good, bad, "BadDigest")
    await refused("dev-a", header_for(good, size=len(good) - 1), good, bad, "TooLarge")  # more bytes than declared
    huge = header_for(good, size=intake_limit() + 1)
    await refused("dev-a", huge, good, bad, "TooLarge")
    await refused("dev-x", header_for(good), good, pre, "NotSelected")
    await refused("dev-a", header_for(good, version=7), good, bad, "StaleModel")

    accepted = await push(devices_stub, creds["dev-a"], header_for(good), good)
    assert accepted.accepted and accepted.digest == digest(good)
    await refused("dev-a", header_for(good), good, pre, "Duplicate")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await push(devices_stub, creds["dev-a"], header_for(good, round_number=2), good)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND

    stored = await store.round(task=TASK, number=1)
    assert stored is not None and stored.received == ("dev-a",)
    assert stored.refusals == {
        "InvalidUpdate": 4,
        "BadDigest": 1,
        "TooLarge": 1,
        "NotSelected": 1,
        "Duplicate": 1,
        "StaleModel": 1,
    }
    kept = await store.accepted_updates(task=TASK, number=1)
    assert [(u.device, u.digest, u.samples, u.metrics) for u in kept] == [("dev-a", digest(good), 10, {"loss": 0.5})]
    assert controller.blobs.has(digest(good))

    # the round closes (failed): an update for it is refused as closed
    await store.update_round(rounds.cancel(stored, reason="stop"), expected=rounds.Phase.COLLECTING)
    await refused("dev-b", header_for(good), good, pre, "RoundClosed")
    closed = await store.round(task=TASK, number=1)
    assert closed is not None and closed.refusals["RoundClosed"] == 1


def intake_limit() -> int:
    from tether.controller.fl import intake

    return intake.DEFAULT_MAX_UPDATE_BYTES


async def test_a_bad_header_is_refused_naming_the_field(controller, admin_client, devices_stub, tmp_path) -> None:
    await federated_release(controller, admin_client, tmp_path)
    creds = await enroll(devices_stub, "dev-a")
    data = b"x" * 10
    for over, field in (
        ({"sample_count": 0}, "sample_count"),
        ({"encoding": "int4"}, "encoding"),
        ({"sha256": "md5:1"}, "sha256"),
        ({"metrics": {"loss": float("nan")}}, "metrics"),
        ({"round": 0}, "round"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await push(devices_stub, creds, header_for(data, **over), data)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await devices_stub.PushUpdate(iter([pb.PushUpdateChunk(data=b"x")]), metadata=creds)
    assert "header" in info.value.details()


async def test_a_late_update_is_kept_under_late_updates_keep_never_folded(
    controller, admin_client, devices_stub, tmp_path
) -> None:
    model_digest, _ = await federated_release(controller, admin_client, tmp_path)
    keep = federation.parse_federation({**FEDERATED, "lateUpdates": "keep"})
    assert keep is not None
    await admin_client.apply_release(
        release=TASK,
        manifest_digest=(await controller.storage.releases.get_release(TASK)).manifest_digest,
        trigger={"type": "onDemand"},
        federated={**FEDERATED, "lateUpdates": "keep"},
    )
    creds = await enroll(devices_stub, "dev-a")
    store = controller.storage.rounds
    r = rounds.open_round(task=TASK, number=1, rules=keep, now=0.0)
    r = rounds.Round(**{**r.__dict__, "model": model_digest, "version": 2})
    await store.create_round(r)
    chosen = rounds.select(r, eligible=["dev-a", "dev-b"], rules=keep, now=0.0)  # its deadline has passed
    await store.update_round(chosen, expected=rounds.Phase.OPEN)
    good = tensorfiles.encode_update({n: np.ones(a.shape) for n, a in MODEL.items()}, encoding="float16")
    answer = await push(devices_stub, creds, header_for(good, encoding="float16", version=2), good)
    assert not answer.accepted and answer.refusal == "LateKept" and answer.digest == digest(good)
    stored = await store.round(task=TASK, number=1)
    assert stored is not None and stored.late == 1 and stored.received == () and stored.refusals == {"LateKept": 1}
    assert await store.accepted_updates(task=TASK, number=1) == []  # kept, never folded
    assert controller.blobs.has(digest(good))
