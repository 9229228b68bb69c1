"""Protocol pieces for scale: polling GetDesired, CDN-ready blob URLs, byte counters, the chunk cache."""

from __future__ import annotations

import asyncio
import hashlib
import os

import grpc
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, start_controller

from tether.common import auth, manifest
from tether.common.admin_client import AdminClient
from tether.controller import blobcache, blobs, blobstores, hub, stats
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc


class CdnBlobStore(blobs.FilesystemBlobStore):
    """A blob store that can hand out direct URLs (as an object store with presigned URLs would)."""

    def url_for(self, digest: str) -> str | None:
        return "https://cdn.example/blobs/" + digest.removeprefix("sha256:")


async def _publish(client: AdminClient, root, files: dict[str, bytes]) -> manifest.Manifest:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    bundle = manifest.hash_directory(root, name="demo-task", entrypoint="task.py")
    await client.upload_bundle(root, bundle)
    await client.apply_release(release="ns/task", manifest_digest=bundle.digest)
    return bundle


async def test_get_desired_polls_the_sync_and_get_manifest_offers_blob_urls(scale_config, tmp_path):
    running = await start_controller(scale_config, blob_store=CdnBlobStore(scale_config.blob_dir))
    try:
        async with (
            grpc.aio.insecure_channel(running.address) as ch,
            AdminClient(running.address, token=ADMIN_TOKEN) as client,
        ):
            stub = pb_grpc.DeviceServiceStub(ch)
            enrolled = await stub.Enroll(
                pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="poller"))
            )
            md = auth.bearer_metadata(enrolled.credential)
            assert list((await stub.GetDesired(pb.GetDesiredRequest(), metadata=md)).desired) == []
            files = {"task.py": b"def run(ctx):\n    return {}\n", "model.bin": os.urandom(300_000)}
            bundle = await _publish(client, tmp_path / "b", files)
            (task,) = (await stub.GetDesired(pb.GetDesiredRequest(), metadata=md)).desired
            assert (task.release, task.version, task.manifest_digest) == ("ns/task", 1, bundle.digest)

            got = await stub.GetManifest(
                pb.GetManifestRequest(release="ns/task", manifest_digest=bundle.digest), metadata=md
            )
            assert dict(got.blob_urls) == {
                f.sha256: "https://cdn.example/blobs/" + f.sha256.removeprefix("sha256:") for f in bundle.files
            }

            # The controller still serves every blob itself (the fallback), and counts what it sent.
            (model,) = [f for f in bundle.files if f.path == "model.bin"]
            before = running.counters.methods["/tether.v1.DeviceService/GetManifest"].response_bytes
            data = b"".join(
                [
                    c.data
                    async for c in stub.PullBlob(
                        pb.PullBlobRequest(release="ns/task", digest=model.sha256, offset=0), metadata=md
                    )
                ]
            )
            assert "sha256:" + hashlib.sha256(data).hexdigest() == model.sha256
            pulled = running.counters.methods["/tether.v1.DeviceService/PullBlob"]
            assert pulled.calls == 1 and model.size < pulled.response_bytes < model.size + 200
            assert before > len(bundle.canonical_bytes())

            answer = await pb_grpc.StatsServiceStub(ch).GetServerStats(
                pb.GetServerStatsRequest(), metadata=auth.bearer_metadata(ADMIN_TOKEN)
            )
            assert answer.replica_id == running.replica_id and answer.rss_bytes > 0 and answer.open_fds > 0
            assert any(
                r.method.endswith("/PullBlob") and r.response_bytes == pulled.response_bytes for r in answer.rpcs
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.StatsServiceStub(ch).GetServerStats(pb.GetServerStatsRequest(), metadata=md)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(grace=0.1)


async def test_the_chunk_cache_serves_aligned_chunks_from_memory_and_stays_bounded(tmp_path):
    files = blobs.FilesystemBlobStore(tmp_path / "blobs")
    store = blobstores.LocalBackend(files)  # what the services read through
    data = os.urandom(10_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files.put_stream(digest, [data])
    cache = blobcache.ChunkCache(max_bytes=5_000, chunk_size=1_000)
    total = await cache.size(store, digest)
    assert total == 10_000

    async def read(offset: int) -> bytes:
        return b"".join([c async for c in cache.chunks(store, digest, offset=offset, total=total)])

    assert await read(0) == data
    assert cache.bytes <= 5_000  # only the most recent chunks stay
    hits = cache.hits
    assert await read(7_000) == data[7_000:]
    assert cache.hits == hits + 3  # 7000, 8000, 9000: all in memory
    # A resume at an unaligned offset reads up to the next boundary, then continues aligned.
    chunks = [c async for c in cache.chunks(store, digest, offset=2_500, total=total)]
    assert b"".join(chunks) == data[2_500:] and len(chunks[0]) == 500
    assert [c async for c in cache.chunks(store, digest, offset=total, total=total)] == []
    with pytest.raises(Exception, match="outside"):
        await read(total + 1)


async def test_a_dropped_slow_device_is_counted():
    h = hub.Hub(queue_size=1)
    conn = h.connect(device_id="slow", facts=None)  # type: ignore[arg-type]
    event = pb.ServerEvent(heartbeat=pb.Heartbeat(server_time_ms=1))
    assert h.offer(conn, event)
    assert not h.offer(conn, event)
    assert h.dropped == 1 and not h.is_connected("slow")


def test_process_stats_read_this_process():
    p = stats.process_stats()
    assert p.rss_bytes > 10 * 1024 * 1024 and p.cpu_seconds > 0 and p.open_fds > 0


async def test_counters_count_every_message_both_ways():
    counters = stats.RpcCounters()
    c = counters._counters("/x/Y")
    handler = grpc.unary_unary_rpc_method_handler(
        lambda req, ctx: req, request_deserializer=lambda b: b.upper(), response_serializer=lambda m: m + b"!"
    )
    wrapped = stats._counting_handler(handler, c)
    raw = wrapped.request_deserializer(b"abc")
    response = await wrapped.unary_unary(raw, None)
    assert wrapped.response_serializer(response) == b"ABC!"
    assert (c.request_messages, c.request_bytes, c.response_messages, c.response_bytes) == (1, 3, 1, 4)
    await asyncio.sleep(0)
