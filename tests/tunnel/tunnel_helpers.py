"""Helpers of the tunnel tests: a fresh key prefix on the session's redis-server, records, a consumer."""

from __future__ import annotations

import uuid

from tether.controller.tunnel import brokers, redis_streams


def tunnel_url(broker_url: str, **query: object) -> str:
    """`broker_url` (the session's redis) with a prefix of its own: tests never see each other's keys."""
    params = {"prefix": f"t-{uuid.uuid4().hex[:12]}", **query}
    return broker_url + "?" + "&".join(f"{k}={v}" for k, v in params.items())


def prefix_of(url: str) -> str:
    return redis_streams._split_url(url)[1]["prefix"]


def record(device: str, seq: int, topic: str = "clicks", payload: bytes = b"p") -> brokers.Record:
    return brokers.Record(
        device=device, seq=seq, topic=topic, payload=payload, emitted_at_ms=1, release="ns/t", received_at_ms=2
    )


async def read_all(consumer: redis_streams.RedisStreamsConsumer, want: int, *, rounds: int = 50) -> list:
    """Read (and ack) until `want` deliveries came, or `rounds` reads of 100 ms came back short."""
    out: list = []
    for _ in range(rounds):
        got = await consumer.read(count=500, block_ms=100)
        await consumer.ack(got)
        out.extend(got)
        if len(out) >= want:
            break
    return out


def write_bundle(root, task_source: str):
    """A bundle directory with no engine: task.py + bundle.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(task_source)
    (root / "bundle.yaml").write_text("name: t\nentrypoint: task.py\n")
    return root
