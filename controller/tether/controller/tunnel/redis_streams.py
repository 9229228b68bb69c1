"""The default tunnel broker: Redis Streams (the embedded redis-server in the demo and tests).

Layout: one stream per topic, `<prefix>:<topic>` (prefix `tether:tunnel`),
fields device, seq, key, release, emitted_at_ms, received_at_ms, payload;
XADD with `MAXLEN ~ maxlen` (default 100,000 per topic), so a topic nobody
reads stays bounded. Per device a high-water mark `<prefix>:hwm:<device>`
(the highest seq accepted, kept 30 days after its last use).

`publish` is one Lua script (atomic in Redis, whatever the replica or the
retry): each record whose seq is above the mark is XADDed and moves the mark;
the others are duplicates. Redis answers after the write, so with the
server's persistence settings (AOF `appendfsync` for durability across a
Redis crash) the record is in the broker when the device is acked.

Consumers (`RedisStreamsConsumer`) read through a consumer group: entries
another consumer of the group read and did not ack within `claim_idle_ms`
are taken over with XAUTOCLAIM first, then new ones with XREADGROUP `>`; XACK
after processing. URL: `redis://host:port/db?maxlen=N&prefix=P` (the two
query keys are ours; the rest goes to redis-py).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tether.controller.tunnel import brokers

DEFAULT_PREFIX = "tether:tunnel"
DEFAULT_MAXLEN = 100_000
HWM_TTL_S = 30 * 86400

# KEYS: hwm, then one stream key per record. ARGV: maxlen, ttl, device, then 5 per record:
# seq, release, emitted_at_ms, received_at_ms, payload. seqs are decimal strings below 2^53.
_PUBLISH = """
local hwm_s = redis.call('GET', KEYS[1])
local hwm = tonumber(hwm_s or '0')
local maxlen, device = ARGV[1], ARGV[3]
local accepted, dup = 0, 0
local n = (#ARGV - 3) / 5
for i = 0, n - 1 do
  local b = 4 + i * 5
  local seq = tonumber(ARGV[b])
  if seq <= hwm then
    dup = dup + 1
  else
    redis.call('XADD', KEYS[2 + i], 'MAXLEN', '~', maxlen, '*',
      'device', device, 'seq', ARGV[b], 'key', device .. ':' .. ARGV[b], 'release', ARGV[b + 1],
      'emitted_at_ms', ARGV[b + 2], 'received_at_ms', ARGV[b + 3], 'payload', ARGV[b + 4])
    hwm, hwm_s = seq, ARGV[b]
    accepted = accepted + 1
  end
end
if accepted > 0 then
  redis.call('SET', KEYS[1], hwm_s, 'EX', ARGV[2])
end
return {accepted, dup}
"""


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("maxlen", "prefix")}
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in ours])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), ours


def stream_key(prefix: str, topic: str) -> str:
    return f"{prefix}:{topic}"


class RedisStreamsBroker:
    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, maxlen: int = DEFAULT_MAXLEN) -> None:
        self.client = client
        self.prefix = prefix
        self.maxlen = maxlen
        self._script = client.register_script(_PUBLISH)

    @classmethod
    def from_url(cls, url: str) -> RedisStreamsBroker:
        base, ours = _split_url(url)
        try:
            maxlen = int(ours.get("maxlen", DEFAULT_MAXLEN))
        except ValueError:
            maxlen = -1
        if maxlen < 1:
            from tether.common import errors

            raise errors.InvalidArgument(f"tunnel_url: maxlen must be a positive integer, got {ours.get('maxlen')!r}")
        return cls(aioredis.from_url(base), prefix=ours.get("prefix", DEFAULT_PREFIX), maxlen=maxlen)

    async def publish(self, device: str, records: Sequence[brokers.Record]) -> brokers.Published:
        if not records:
            return brokers.Published(0, 0)
        keys = [f"{self.prefix}:hwm:{device}", *(stream_key(self.prefix, r.topic) for r in records)]
        args: list[Any] = [self.maxlen, HWM_TTL_S, device]
        for r in records:
            args += [str(r.seq), r.release, r.emitted_at_ms, r.received_at_ms, r.payload]
        accepted, duplicates = await self._script(keys=keys, args=args)
        return brokers.Published(int(accepted), int(duplicates))

    async def close(self) -> None:
        await self.client.aclose()


def _delivery(topic: str, entry_id: Any, fields: dict[bytes, bytes]) -> brokers.Delivery:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    def number(name: bytes) -> int:
        with contextlib.suppress(ValueError):
            return int(fields.get(name, b"0"))
        return 0

    return brokers.Delivery(
        id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
        topic=topic,
        device=text(b"device"),
        seq=number(b"seq"),
        release=text(b"release"),
        emitted_at_ms=number(b"emitted_at_ms"),
        received_at_ms=number(b"received_at_ms"),
        payload=fields.get(b"payload", b""),
    )


class RedisStreamsConsumer:
    """One consumer (`name`) of a group (`group`) on one topic's stream."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        topic: str,
        group: str,
        name: str,
        prefix: str = DEFAULT_PREFIX,
        start: str = "$",
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.client = client
        self.topic = topic
        self.group = group
        self.name = name
        self.key = stream_key(prefix, topic)
        self.start = start  # where a new group begins: "$" new records only, "0" the whole stream
        self.claim_idle_ms = claim_idle_ms
        self._ready = False
        self._claim_from = "0-0"

    @classmethod
    def from_url(cls, url: str, *, topic: str, group: str, name: str, **kwargs: Any) -> RedisStreamsConsumer:
        base, ours = _split_url(url)
        return cls(
            aioredis.from_url(base),
            topic=topic,
            group=group,
            name=name,
            prefix=ours.get("prefix", DEFAULT_PREFIX),
            **kwargs,
        )

    async def _ensure_group(self) -> None:
        if self._ready:
            return
        try:
            await self.client.xgroup_create(self.key, self.group, id=self.start, mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._ready = True

    async def read(self, *, count: int = 100, block_ms: int = 1000) -> list[brokers.Delivery]:
        await self._ensure_group()
        # Entries a dead consumer of the group read and never acked, idle long enough: ours now.
        claim: Any = await self.client.xautoclaim(
            self.key, self.group, self.name, min_idle_time=self.claim_idle_ms, start_id=self._claim_from, count=count
        )
        nxt, claimed = claim[0], claim[1]
        self._claim_from = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
        out = [_delivery(self.topic, i, f) for i, f in claimed if f]
        if out:
            return out
        reply: Any = await self.client.xreadgroup(self.group, self.name, {self.key: ">"}, count=count, block=block_ms)
        for _stream, entries in reply or []:
            out.extend(_delivery(self.topic, i, f) for i, f in entries)
        return out

    async def ack(self, deliveries: Sequence[brokers.Delivery]) -> None:
        if deliveries:
            await self.client.xack(self.key, self.group, *(d.id for d in deliveries))

    async def close(self) -> None:
        await self.client.aclose()
