"""The uplink against a scripted send: order, acks, retries after any failure, splitting, dropping one bad record."""

from __future__ import annotations

import asyncio

import grpc

from tether.agent import client
from tether.agent.tunnel import uplink
from tether.agent.tunnel.outbox import Outbox
from tether.proto.v1 import tunnel_pb2
from tether.spec import emits

FAST = client.Backoff(initial_s=0.001, max_s=0.01)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Cloud:
    """Records what arrives; `script` says how to answer the next calls (an exception, or None: accept)."""

    def __init__(self, script=()) -> None:
        self.script = list(script)
        self.batches: list[list[int]] = []
        self.kept: list[bytes] = []

    async def send(self, batch: tunnel_pb2.EmitBatch) -> tunnel_pb2.EmitAck:
        self.batches.append([r.seq for r in batch.records])
        step = self.script.pop(0) if self.script else None
        if callable(step):
            step = step(batch)
        if step is not None:
            raise step
        self.kept.extend(r.payload for r in batch.records)
        return tunnel_pb2.EmitAck(acked_through=batch.records[-1].seq, accepted=len(batch.records))


async def drain(box: Outbox, cloud: Cloud, limits: emits.TunnelLimits = emits.TunnelLimits()) -> uplink.Uplink:
    up = uplink.Uplink(outbox=box, send=cloud.send, limits=limits, backoff=FAST)
    task = asyncio.create_task(up.run())
    up.wake()
    for _ in range(2000):
        if len(box) == 0:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return up


def fill(box: Outbox, n: int, payload: bytes = b"p") -> list[int]:
    return [box.append(topic="t", payload=payload + b"%d" % i, release="") for i in range(n)]


async def test_any_failure_is_retried_and_records_arrive_once_in_order(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db").open()
    fill(box, 5)
    cloud = Cloud([rpc_error(grpc.StatusCode.UNAVAILABLE, "down"), RuntimeError("a bug in a channel")])
    up = await drain(box, cloud)
    assert cloud.kept == [b"p%d" % i for i in range(5)] and up.failures == 2
    assert cloud.batches[0] == cloud.batches[1] == cloud.batches[2]  # the same batch, resent as is
    assert "RuntimeError: a bug in a channel" in up.last_error


async def test_a_batch_refused_for_its_size_is_split_and_a_bad_record_dropped(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db").open()
    seqs = fill(box, 8)
    bad = seqs[5]

    def refuse_large_or_bad(batch):
        found = [r.seq for r in batch.records]
        if len(found) > 2:
            return rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "tunnel limit batch_records exceeded: batch of 8")
        if bad in found:
            return rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "tunnel limit payload_bytes exceeded: records[0]")
        return None

    cloud = Cloud([refuse_large_or_bad] * 50)
    up = await drain(box, cloud)
    assert cloud.kept == [b"p%d" % i for i in range(8) if i != 5]
    assert up.dropped == 1 and len(box) == 0


async def test_a_rate_refusal_waits_and_sends_the_same_records_again(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db").open()
    fill(box, 3)
    too_fast = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "tunnel limit records_per_s exceeded: retry in 0.1s")
    cloud = Cloud([too_fast, too_fast])
    up = await drain(box, cloud)
    assert cloud.kept == [b"p0", b"p1", b"p2"] and up.dropped == 0 and up.failures == 2
