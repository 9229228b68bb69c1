"""`tether tunnel tail TOPIC`: read what devices emit on a topic, as a consumer of the tunnel's broker.

A consumer group member like any other (`tether.controller.tunnel.redis_streams`):
`--group` names the group (default: a new one per run, so tailing never steals
records from your real consumers), entries are acked after they were printed,
and records another member of the group left unacked are claimed first.
One line per record: receive time, device, seq, release and the payload
(UTF-8 text as is, up to `--width` characters; anything else as base64).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid

import click

from tether.common import config


def _render(payload: bytes, width: int) -> str:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = "base64:" + base64.b64encode(payload).decode()
    return text if len(text) <= width else f"{text[:width]}… ({len(payload)} bytes)"


@click.group()
def tunnel() -> None:
    """The real-time tunnel: what tasks emit with ctx.emit(topic, payload)."""


@tunnel.command("tail")
@click.argument("topic")
@click.option("--url", envvar=config.ENV_TUNNEL_URL, required=True, help="The broker [env TETHER_TUNNEL_URL].")
@click.option("--group", default=None, help="Consumer group (default: a new one, reading only new records).")
@click.option("--from-start", is_flag=True, help="A new group starts at the oldest record kept, not the newest.")
@click.option("--count", "limit", type=click.IntRange(min=1), default=None, help="Stop after this many records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record (payload base64).")
@click.option("--width", type=click.IntRange(min=8), default=120, show_default=True)
def tail(
    topic: str, url: str, group: str | None, from_start: bool, limit: int | None, as_json: bool, width: int
) -> None:
    """Print records of TOPIC as they arrive (Ctrl-C stops)."""
    from tether.controller.tunnel import redis_streams
    from tether.spec import emits

    try:
        emits.check_topic(topic)
    except Exception as e:
        raise click.BadParameter(str(e), param_hint="TOPIC") from None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise click.BadParameter("tail reads Redis Streams (redis://, rediss://, unix://)", param_hint="--url")
    consumer = redis_streams.RedisStreamsConsumer.from_url(
        url,
        topic=topic,
        group=group or f"tether-tail-{uuid.uuid4().hex[:8]}",
        name=f"tail-{os.getpid()}",
        start="0" if from_start else "$",
    )

    async def run() -> None:
        seen = 0
        try:
            while limit is None or seen < limit:
                batch = await consumer.read(count=100 if limit is None else min(100, limit - seen), block_ms=1000)
                for d in batch:
                    if as_json:
                        line = json.dumps(
                            {
                                "topic": d.topic, "device": d.device, "seq": d.seq, "key": d.key,
                                "release": d.release, "emitted_at_ms": d.emitted_at_ms,
                                "received_at_ms": d.received_at_ms, "payload": base64.b64encode(d.payload).decode(),
                            }
                        )  # fmt: skip
                    else:
                        at = time.strftime("%H:%M:%S", time.localtime(d.received_at_ms / 1000))
                        line = f"{at} {d.device} #{d.seq} {d.release or '-'} {_render(d.payload, width)}"
                    click.echo(line)
                await consumer.ack(batch)
                seen += len(batch)
        finally:
            await consumer.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
