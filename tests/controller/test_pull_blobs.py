"""PullBlobs: every missing blob of a version in one stream, against a real controller and PostgreSQL."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from controller_helpers import enroll, make_bundle

from tether.common import manifest
from tether.proto.v1 import tether_pb2 as pb

ANDROID = {"matchLabels": {"os": "android"}}
CHUNK = 256 * 1024
FILES = {
    "task.py": b"def run(ctx):\n    return {'sample_count': 1}\n",
    "model.bin": os.urandom(3 * CHUNK + 1000),  # several chunks
    "weights.bin": os.urandom(CHUNK),  # exactly one chunk
    "data/labels.txt": b"a\nb\n",
    "empty.txt": b"",
}


async def publish(admin_client, tmp_path, *, release="ns/task", target=None, files=None):
    directory, bundle = make_bundle(tmp_path / f"bundle-{release.replace('/', '-')}", files=files or FILES)
    await admin_client.upload_bundle(directory, bundle)
    await admin_client.apply_release(release=release, manifest_digest=bundle.digest, target=target or {})
    return directory, bundle


def ranges(*pairs: tuple[str, int]) -> list[pb.BlobRange]:
    return [pb.BlobRange(digest=d, offset=o) for d, o in pairs]


async def pull(stub, md, release, blobs) -> tuple[list[pb.BlobChunk], grpc.aio.AioRpcError | None]:
    """Every chunk the call sent, and the error it ended with (None: OK)."""
    got: list[pb.BlobChunk] = []
    try:
        async for chunk in stub.PullBlobs(pb.PullBlobsRequest(release=release, blobs=blobs), metadata=md):
            got.append(chunk)
    except grpc.aio.AioRpcError as e:
        return got, e
    return got, None


def by_blob(chunks: list[pb.BlobChunk]) -> list[tuple[str, list[pb.BlobChunk]]]:
    """Chunks grouped by digest in arrival order; a digest that came back after another blob is a second group."""
    groups: list[tuple[str, list[pb.BlobChunk]]] = []
    for c in chunks:
        if not groups or groups[-1][0] != c.digest:
            groups.append((c.digest, []))
        groups[-1][1].append(c)
    return groups


async def test_one_call_streams_every_blob_in_request_order(admin_client, devices_stub, controller, tmp_path):
    md = await enroll(devices_stub, "puller", {"os": "android"})
    directory, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    content = {f.sha256: (directory / f.path).read_bytes() for f in bundle.files}
    order = sorted(content, reverse=True)  # any order the device likes, not the manifest's

    lookups = 0
    real = controller.releases.release_for_device

    async def counted(*args, **kwargs):
        nonlocal lookups
        lookups += 1
        return await real(*args, **kwargs)

    controller.releases.release_for_device = counted
    chunks, err = await pull(devices_stub, md, "ns/task", ranges(*[(d, 0) for d in order]))
    assert err is None
    assert lookups == 1  # one release lookup (and one authentication) for all the blobs
    assert controller.counters.methods["/tether.v1.DeviceService/PullBlobs"].calls == 1

    groups = by_blob(chunks)
    assert [d for d, _ in groups] == order  # request order, each blob's chunks contiguous
    for digest, cs in groups:
        data = content[digest]
        assert b"".join(c.data for c in cs) == data
        assert manifest.sha256_digest(b"".join(c.data for c in cs)) == digest
        assert {c.total_size for c in cs} == {len(data)}
        assert all(len(c.data) <= CHUNK for c in cs)
        offsets = [c.offset for c in cs]
        assert offsets == [sum(len(c.data) for c in cs[:i]) for i in range(len(cs))]
    empty = next(f.sha256 for f in bundle.files if f.path == "empty.txt")
    assert [(c.offset, c.data, c.total_size) for c in dict(groups)[empty]] == [(0, b"", 0)]


async def test_each_blob_resumes_from_its_own_offset(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "resumer", {"os": "android"})
    directory, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    model, weights, labels = (bundle.file(p) for p in ("model.bin", "weights.bin", "data/labels.txt"))
    data = {f.sha256: (directory / f.path).read_bytes() for f in (model, weights, labels)}
    wanted = [(model.sha256, CHUNK + 17), (weights.sha256, weights.size), (labels.sha256, 1)]

    chunks, err = await pull(devices_stub, md, "ns/task", ranges(*wanted))
    assert err is None
    groups = by_blob(chunks)
    assert [d for d, _ in groups] == [d for d, _ in wanted]
    for (digest, offset), (_, cs) in zip(wanted, groups, strict=True):
        assert cs[0].offset == offset
        assert data[digest][:offset] + b"".join(c.data for c in cs) == data[digest]
    # A blob asked for from its end: one empty chunk that still tells its size.
    assert [(c.offset, c.data, c.total_size) for c in groups[1][1]] == [(weights.size, b"", weights.size)]
    # A resume at an unaligned offset reads up to the next chunk boundary, then continues aligned.
    assert [c.offset for c in groups[0][1]] == [CHUNK + 17, 2 * CHUNK, 3 * CHUNK]


async def test_a_blob_outside_the_release_is_refused_before_anything_is_sent(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "and-1", {"os": "android"})
    _, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    # A stored blob of another release (one this device is not even targeted by) is not readable through this one.
    _, other = await publish(
        admin_client, tmp_path, release="ns/other", target={"matchLabels": {"os": "ios"}}, files={"task.py": b"x\n"}
    )
    mine = bundle.file("model.bin").sha256
    foreign = other.files[0].sha256
    for blobs in (
        ranges((mine, 0), (foreign, 0)),  # the first one is fine: still nothing may be sent
        ranges((foreign, 0)),
        ranges((mine, 0), ("sha256:" + "0" * 64, 0)),  # not stored anywhere
    ):
        chunks, err = await pull(devices_stub, md, "ns/task", blobs)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert chunks == []
    assert "is not part of release" in err.details()


@pytest.mark.parametrize(
    "case",
    ["none", "too-many", "duplicate", "negative-offset", "malformed-digest", "offset-beyond-size"],
)
async def test_malformed_requests_are_invalid_and_send_nothing(admin_client, devices_stub, tmp_path, case):
    md = await enroll(devices_stub, "and-2", {"os": "android"})
    _, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    model, weights = bundle.file("model.bin"), bundle.file("weights.bin")
    blobs = {
        "none": [],
        "too-many": ranges(*[(manifest.sha256_digest(str(i).encode()), 0) for i in range(1025)]),
        "duplicate": ranges((model.sha256, 0), (weights.sha256, 0), (model.sha256, 10)),
        "negative-offset": ranges((model.sha256, 0), (weights.sha256, -1)),
        "malformed-digest": ranges((model.sha256, 0), ("sha256:XYZ" + "x" * 5000, 0)),
        "offset-beyond-size": ranges((model.sha256, 0), (weights.sha256, weights.size + 1)),
    }[case]
    chunks, err = await pull(devices_stub, md, "ns/task", blobs)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err)
    assert chunks == []
    assert len(err.details()) < 500  # a huge bad digest is not echoed back whole
    if case == "too-many":
        assert "1024" in err.details()


async def test_the_bound_is_inclusive(admin_client, devices_stub, tmp_path):
    """Exactly MAX_BLOBS_PER_PULL blobs are accepted (a bundle may have more; agents split them)."""
    files = {"task.py": b"def run(ctx):\n    return {}\n"}
    files.update({f"f/{i:04d}.txt": f"{i}\n".encode() for i in range(manifest.MAX_BLOBS_PER_PULL - 1)})
    md = await enroll(devices_stub, "and-3", {"os": "android"})
    directory, bundle = await publish(admin_client, tmp_path, target=ANDROID, files=files)
    digests = bundle.blob_digests()
    assert len(digests) == manifest.MAX_BLOBS_PER_PULL
    chunks, err = await pull(devices_stub, md, "ns/task", ranges(*[(d, 0) for d in digests]))
    assert err is None
    assert [c.digest for c in chunks] == digests  # one chunk each: every file is tiny
    assert {c.digest: c.data for c in chunks} == {f.sha256: (directory / f.path).read_bytes() for f in bundle.files}


async def test_devices_not_targeted_and_unknown_releases_are_refused(admin_client, devices_stub, tmp_path):
    md_ios = await enroll(devices_stub, "ios-1", {"os": "ios"})
    _, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    blobs = ranges(*[(d, 0) for d in bundle.blob_digests()])
    chunks, err = await pull(devices_stub, md_ios, "ns/task", blobs)
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED and chunks == []
    chunks, err = await pull(devices_stub, md_ios, "ns/nope", blobs)
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND and chunks == []
    chunks, err = await pull(devices_stub, (("authorization", "Bearer nonsense"),), "ns/task", blobs)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED and chunks == []


async def test_pull_blob_is_unchanged_beside_it(admin_client, devices_stub, tmp_path):
    """The single-blob call still serves older agents, byte for byte as before (no digest on its chunks)."""
    md = await enroll(devices_stub, "old-agent", {"os": "android"})
    directory, bundle = await publish(admin_client, tmp_path, target=ANDROID)
    model = bundle.file("model.bin")
    chunks = [
        c async for c in devices_stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=model.sha256), metadata=md)
    ]
    assert b"".join(c.data for c in chunks) == (directory / "model.bin").read_bytes()
    assert {c.digest for c in chunks} == {""}


async def test_a_device_may_have_only_a_few_pulls_in_progress(admin_client, devices_stub, controller, tmp_path):
    from tether.controller import device_service

    md = await enroll(devices_stub, "greedy", {"os": "android"})
    big = {"task.py": FILES["task.py"], "model.bin": os.urandom(30 * CHUNK)}  # 7.5 MiB: more than flow control lets by
    _, bundle = await publish(admin_client, tmp_path, target=ANDROID, files=big)
    model = bundle.file("model.bin").sha256
    calls = []
    try:
        for _ in range(device_service.MAX_PULLS_PER_DEVICE):  # each reads one chunk, then stops reading
            call = devices_stub.PullBlobs(pb.PullBlobsRequest(release="ns/task", blobs=ranges((model, 0))), metadata=md)
            await call.read()
            calls.append(call)
        chunks, err = await pull(devices_stub, md, "ns/task", ranges((model, 0)))
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and chunks == []
        assert "pulls in progress" in err.details()
        other = await enroll(devices_stub, "patient", {"os": "android"})  # another device is not affected
        chunks, err = await pull(devices_stub, other, "ns/task", ranges((bundle.file("task.py").sha256, 0)))
        assert err is None and b"".join(c.data for c in chunks) == FILES["task.py"]
    finally:
        for call in calls:
            call.cancel()
    calls[0].cancel()
    chunks, err = await pull(devices_stub, md, "ns/task", ranges((bundle.file("task.py").sha256, 0)))
    # A cancelled pull frees its place (the server sees the cancellation asynchronously: retry briefly).
    for _ in range(50):
        if err is None:
            break
        await asyncio.sleep(0.05)
        chunks, err = await pull(devices_stub, md, "ns/task", ranges((bundle.file("task.py").sha256, 0)))
    assert err is None
