"""`tether bench tunnel`: 30 KB emits from N connected simulated agents to a consumer, against direct Redis.

What runs: an embedded PostgreSQL and redis-server (or those named), one
`tether controller` process with `--tunnel-url` on that redis-server, and, in
this process on one event loop, N simulated agents and one consumer. Each
agent enrols, holds its Subscribe stream (it is connected as a device is),
and runs the agent's own tunnel (`tether.agent.tunnel.relay.Tunnel`: the
SQLite outbox in its own directory, the uplink, gzip-compressed `Emit` calls
on its channel with its credential). Agents share HTTP/2 connections
`--share` at a time (as behind an L7 proxy). For `--duration` seconds each
agent emits one `--payload-kib` payload every `--interval` seconds, at a
random phase; the consumer (`RedisStreamsConsumer`, XREADGROUP + XACK in a
consumer group) reads the topic. Latency of a record: the consumer's clock
when it read the record minus the agent's clock when `emit` was called (one
machine, one clock; the time is in the payload's first 8 bytes, the rest is
random, so incompressible: gzip costs CPU and saves nothing, the worst case).

Baseline, same run, same payloads and schedule: every emit is instead an
XADD straight to a stream of the same redis-server (one client, as a
producer library would) and the same consumer code reads it: what the
broker alone costs. The JSON: tunnel_p50_ms, tunnel_p99_ms, redis_p50_ms,
redis_p99_ms, p99_ratio (tunnel / redis), p99_overhead_ms, delivered and
lost counts, duplicates, the controller's CPU seconds; goal
tunnel_p99_ms <= 100 on loopback.

    tether bench tunnel --agents 200 --out bench/results/tunnel-200.json
    tether bench tunnel --agents 1000 --interval 5 --out bench/results/tunnel-1000.json   # a quiet machine
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import platform
import random
import shutil
import struct
import tempfile
import time
from typing import Any

import click
import grpc

from tether.agent import client
from tether.agent.tunnel import relay
from tether.common import rlimits
from tether.controller.tunnel import redis_streams
from tether.proto.v1 import tether_pb2 as pb
from tether.spec import emits

log = logging.getLogger(__name__)

TOPIC = "bench"
STAMP = struct.Struct("!d")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _payload(size: int) -> bytes:
    return STAMP.pack(time.time()) + os.urandom(size - STAMP.size)


class _Reader:
    """The consumer: reads a topic's stream through a group, acks, and keeps each record's latency."""

    def __init__(self, url: str, topic: str, group: str) -> None:
        self.consumer = redis_streams.RedisStreamsConsumer.from_url(url, topic=topic, group=group, name="bench")
        self.latencies_ms: list[float] = []
        self.keys: set[str] = set()
        self.repeats = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.read(count=1, block_ms=1)  # creates the group at "$" before anything is sent
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stopping:  # stopped by the flag: a redis read cancelled mid-way can hang its close
            batch = await self.consumer.read(count=500, block_ms=50)
            now = time.time()
            for d in batch:
                (sent,) = STAMP.unpack_from(d.payload)
                self.latencies_ms.append((now - sent) * 1000)
                if d.key in self.keys:
                    self.repeats += 1
                self.keys.add(d.key)
            await self.consumer.ack(batch)

    async def until(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.latencies_ms) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await _bounded("the consumer's last read", self._task, 10.0)
        await _bounded("closing the consumer", self.consumer.close(), 10.0)


def _consumer_process(url: str, topic: str, conn: Any) -> None:
    """The consumer in a process of its own (a cloud service is not in the devices' event loop): reads until
    told how many records were sent and it has them all (or 60 s after that), then sends back what it saw."""

    async def main() -> None:
        reader = _Reader(url, topic, "bench")
        await reader.start()
        conn.send("ready")
        while not conn.poll():
            await asyncio.sleep(0.05)
        expected = conn.recv()
        await reader.until(expected, timeout_s=60)
        await reader.stop()
        conn.send({"latencies_ms": reader.latencies_ms, "distinct": len(reader.keys), "repeats": reader.repeats})

    asyncio.run(main())


class _RemoteReader:
    """`_consumer_process` driven from here."""

    def __init__(self, url: str, topic: str) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_consumer_process, args=(url, topic, child), daemon=True)
        self._proc.start()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._conn.recv) == "ready"

    async def result(self, expected: int) -> dict[str, Any]:
        self._conn.send(expected)
        out: dict[str, Any] = await asyncio.to_thread(self._conn.recv)
        await asyncio.to_thread(self._proc.join, 30)
        return out


class SimTunnelAgent:
    """One simulated device: enrolled, subscribed, and the agent's own tunnel over its (shared) channel."""

    def __init__(self, device_id: str, channel: grpc.aio.Channel, state_dir: pathlib.Path) -> None:
        self.device_id = device_id
        self.client = client.DeviceClient("", channel=channel, timeout_s=60)
        self.connected = asyncio.Event()
        self.tunnel = relay.Tunnel(
            state_dir=state_dir,
            send=self.client.emit,
            limits=emits.TunnelLimits(),
            connected=self.connected,
            serve_socket=False,
            backoff=client.Backoff(initial_s=0.05, max_s=2.0),
        )
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, bootstrap_token: str) -> None:
        for attempt in range(6):  # a loaded controller may shed or be slow: retry as the agent's session does
            try:
                reply = await self.client.enroll(
                    bootstrap_token=bootstrap_token, device=pb.DeviceInfo(device_id=self.device_id)
                )
                break
            except grpc.aio.AioRpcError as e:
                if attempt == 5 or not client.is_retryable(e):
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        self.client.credential = reply.credential
        self._stream = self.client.subscribe([])
        self._reader = asyncio.create_task(self._hold())
        await self.tunnel.start()

    async def _hold(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for _event in self._stream:
                self.connected.set()

    async def stop(self) -> None:
        await self.tunnel.stop()
        if self._stream is not None:
            self._stream.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=10)


async def _schedule(n: int, *, interval: float, duration: float, size: int, emit: Any, seed: int) -> int:
    """Every agent i emits every `interval` s from a random phase for `duration` s; how many emits were made."""
    rng = random.Random(seed)
    start = time.monotonic() + 0.5
    times = sorted(
        (start + phase + k * interval, i)
        for i in range(n)
        for phase in (rng.uniform(0, interval),)
        for k in range(max(1, int(duration / interval)))
    )
    for at, i in times:
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await emit(i, _payload(size))
    return len(times)


async def _bounded(what: str, aw: Any, timeout_s: float = 20.0) -> None:
    """Cleanup that must not hang the benchmark's exit."""
    try:
        await asyncio.wait_for(aw, timeout_s)
    except TimeoutError:
        log.warning("%s took longer than %gs; going on", what, timeout_s)


async def _stats(stack: Any) -> float:
    stats = await stack.server_stats()
    return float(stats.cpu_seconds)


async def run_tunnel_bench(
    *,
    agents: int,
    share: int,
    interval: float,
    duration: float,
    payload_kib: float,
    database_url: str | None,
    broker_url: str | None,
    workdir: pathlib.Path,
    seed: int = 0,
) -> dict[str, Any]:
    from tether.devtools import simagent
    from tether.devtools import stack as stack_mod

    rlimits.raise_open_files_limit()
    size = int(payload_kib * 1024)
    stack = stack_mod.LocalStack(
        stack_mod.StackConfig(
            agents=0,
            database_url=database_url,
            broker_url=broker_url,
            workdir=workdir / "stack",
            keep_workdir=True,
            tls=False,
            sign=False,
        )
    )
    await stack.start_services()
    tunnel_url = stack.tunnel_url
    await stack.start_controller()
    # Each its own TCP connection (simagent.new_channel): gRPC otherwise shares one between equal channels.
    channels = [simagent.new_channel(stack.controller_address) for _ in range((agents + share - 1) // share)]
    sims = [
        SimTunnelAgent(f"bench-{i:05d}", channels[i // share], workdir / "agents" / f"{i:05d}") for i in range(agents)
    ]
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        for chunk in range(0, agents, 25):
            await asyncio.gather(*(s.start(stack.bootstrap_token) for s in sims[chunk : chunk + 25]))
        await asyncio.gather(*(s.connected.wait() for s in sims))
        connect_s = time.monotonic() - t0
        log.info("%d agents enrolled and connected in %.1fs; the tunnel phase", agents, connect_s)

        # 1. The tunnel.
        reader = _RemoteReader(tunnel_url, TOPIC)
        await reader.ready()
        cpu0 = await _stats(stack)

        async def via_tunnel(i: int, payload: bytes) -> None:
            sims[i].tunnel.emit(TOPIC, payload, release="bench/tunnel")

        sent = await _schedule(agents, interval=interval, duration=duration, size=size, emit=via_tunnel, seed=seed)
        seen = await reader.result(sent)
        controller_cpu = await _stats(stack) - cpu0
        tunnel = seen["latencies_ms"]
        pending = sum(len(s.tunnel.outbox) for s in sims)
        retries = sum(s.tunnel.uplink.failures for s in sims)
        dupes = sum(s.tunnel.uplink.duplicates for s in sims)

        log.info("tunnel: %d of %d records read; the direct-Redis baseline", len(tunnel), sent)
        # 2. The baseline: the same payloads on the same schedule, XADD straight to the same redis-server.
        baseline = _RemoteReader(tunnel_url, "bench-direct")
        await baseline.ready()
        producer = redis_streams.RedisStreamsBroker.from_url(tunnel_url)
        seqs = [0] * agents

        async def direct(i: int, payload: bytes) -> None:
            seqs[i] += 1
            await producer.client.xadd(
                redis_streams.stream_key(redis_streams.DEFAULT_PREFIX, "bench-direct"),
                {"device": f"bench-{i:05d}", "seq": seqs[i], "payload": payload},
                maxlen=redis_streams.DEFAULT_MAXLEN,
                approximate=True,
            )

        direct_sent = await _schedule(agents, interval=interval, duration=duration, size=size, emit=direct, seed=seed)
        redis = (await baseline.result(direct_sent))["latencies_ms"]
        await producer.close()
        log.info("baseline: %d of %d records read; stopping", len(redis), direct_sent)
    finally:
        await _bounded(
            "stopping the simulated agents", asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
        )
        await _bounded(
            "closing their channels", asyncio.gather(*(ch.close(0) for ch in channels), return_exceptions=True)
        )
        await stack.stop()

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    t50, t99 = _quantile(tunnel, 0.5), _quantile(tunnel, 0.99)
    r50, r99 = _quantile(redis, 0.5), _quantile(redis, 0.99)
    out.update(
        {
            "benchmark": "tunnel",
            "agents": agents,
            "agents_per_connection": share,
            "payload_bytes": size,
            "interval_s": interval,
            "duration_s": duration,
            "offered_records_per_s": round(agents / interval, 1),
            "offered_mb_per_s": round(agents / interval * size / 1e6, 2),
            "connect_s": round(connect_s, 2),
            "tunnel_records": sent,
            "tunnel_delivered": len(tunnel),
            "tunnel_lost": sent - seen["distinct"],
            "tunnel_pending_in_outboxes": pending,
            "tunnel_consumer_repeats": seen["repeats"],
            "tunnel_uplink_retries": retries,
            "tunnel_duplicates_dropped": dupes,
            "tunnel_p50_ms": ms(t50),
            "tunnel_p90_ms": ms(_quantile(tunnel, 0.9)),
            "tunnel_p99_ms": ms(t99),
            "tunnel_max_ms": ms(max(tunnel, default=None)),
            "redis_records": direct_sent,
            "redis_delivered": len(redis),
            "redis_p50_ms": ms(r50),
            "redis_p99_ms": ms(r99),
            "p50_ratio": None if not (t50 and r50) else round(t50 / r50, 2),
            "p99_ratio": None if not (t99 and r99) else round(t99 / r99, 2),
            "p99_overhead_ms": None if t99 is None or r99 is None else round(t99 - r99, 2),
            "controller_cpu_s": round(controller_cpu, 2),
            "controller_cpu_ms_per_record": round(controller_cpu * 1000 / max(1, len(tunnel)), 3),
            "goals": {"tunnel_p99_ms_le_100": t99 is not None and t99 <= 100, "nothing_lost": sent == seen["distinct"]},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "method": (
                "one controller process; the agents in this process on one event loop; the consumer in a process "
                "of its own; latency = consumer read time - emit call time (one clock); payloads random "
                "(incompressible)"
            ),
        }
    )
    return out


@click.command("tunnel")
@click.option("--agents", type=click.IntRange(1, 20_000), default=200, show_default=True, help="Simulated agents.")
@click.option("--share", type=click.IntRange(1, 100), default=10, show_default=True, help="Agents per connection.")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 600),
    default=5.0,
    show_default=True,
    help="Seconds between an agent's emits.",
)
@click.option("--duration", type=click.FloatRange(1, 3600), default=20.0, show_default=True, help="Seconds of load.")
@click.option("--payload-kib", type=click.FloatRange(0.1, 63), default=30.0, show_default=True)
@click.option("--database-url", envvar="TETHER_DATABASE_URL", default=None, help="Existing PostgreSQL (else embedded).")
@click.option("--broker-url", envvar="TETHER_BROKER_URL", default=None, help="Existing Redis (else embedded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="tunnel-bench.json", show_default=True)
@click.option("--keep", is_flag=True, help="Keep the working directory (controller log, outboxes).")
def tunnel(
    agents: int,
    share: int,
    interval: float,
    duration: float,
    payload_kib: float,
    database_url: str | None,
    broker_url: str | None,
    seed: int,
    out_path: str,
    keep: bool,
) -> None:
    """Tunnel end-to-end latency (emit -> consumer) vs direct Redis XADD -> XREADGROUP, same payloads, same run."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="tether-bench-tunnel-"))
    try:
        result = asyncio.run(
            run_tunnel_bench(
                agents=agents,
                share=share,
                interval=interval,
                duration=duration,
                payload_kib=payload_kib,
                database_url=database_url,
                broker_url=broker_url,
                workdir=workdir,
                seed=seed,
            )
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("agents", "tunnel_p50_ms", "tunnel_p99_ms", "redis_p50_ms", "redis_p99_ms", "p99_ratio", "tunnel_lost")
    click.echo(json.dumps({k: result[k] for k in keys}))
    click.echo(f"wrote {out_path}")
