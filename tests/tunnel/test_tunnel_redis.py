"""The default broker on a real redis-server: de-duplication by key, order, bounds, consumer groups, plug-ins."""

from __future__ import annotations

import pytest
from tunnel_helpers import prefix_of, read_all, record, tunnel_url

from tether.common import errors
from tether.controller.tunnel import broker_urls, brokers, redis_streams


@pytest.fixture()
async def url(broker_url: str):
    return tunnel_url(broker_url)


@pytest.fixture()
async def broker(url: str):
    b = broker_urls.open_broker(url)
    assert isinstance(b, redis_streams.RedisStreamsBroker)
    yield b
    await b.close()


def consumer(url: str, topic: str = "clicks", name: str = "c1", **kw) -> redis_streams.RedisStreamsConsumer:
    return redis_streams.RedisStreamsConsumer.from_url(url, topic=topic, group="g", name=name, start="0", **kw)


async def test_records_are_published_in_order_and_a_resent_batch_is_dropped_by_key(broker, url) -> None:
    first = await broker.publish("dev-a", [record("dev-a", s, payload=b"%d" % s) for s in (10, 11, 12)])
    assert (first.accepted, first.duplicates) == (3, 0)
    again = await broker.publish("dev-a", [record("dev-a", s) for s in (11, 12, 13)])  # a retry plus one new
    assert (again.accepted, again.duplicates) == (1, 2)
    other = await broker.publish("dev-b", [record("dev-b", 11)])  # seqs are per device
    assert (other.accepted, other.duplicates) == (1, 0)
    c = consumer(url)
    got = await read_all(c, 5)
    await c.close()
    assert [(d.device, d.seq) for d in got] == [
        ("dev-a", 10),
        ("dev-a", 11),
        ("dev-a", 12),
        ("dev-a", 13),
        ("dev-b", 11),
    ]
    assert got[0].payload == b"10" and got[0].key == "dev-a:10" and got[0].release == "ns/t"
    assert (got[0].emitted_at_ms, got[0].received_at_ms) == (1, 2)


async def test_a_large_seq_keeps_its_exact_value(broker, url) -> None:
    """Outbox seqs start at the clock in microseconds: far above 2^32, below 2^53."""
    big = 1_764_633_600_123_456
    await broker.publish("d", [record("d", big), record("d", big + 1)])
    assert (await broker.publish("d", [record("d", big + 1)])).duplicates == 1
    c = consumer(url)
    assert [d.seq for d in await read_all(c, 2)] == [big, big + 1]
    await c.close()


async def test_topics_are_separate_streams_bounded_by_maxlen(broker_url) -> None:
    url = tunnel_url(broker_url, maxlen=10)
    b = broker_urls.open_broker(url)
    await b.publish("d", [record("d", s, topic="busy") for s in range(1, 201)])
    await b.publish("d", [record("d", 201, topic="quiet")])
    assert isinstance(b, redis_streams.RedisStreamsBroker)
    length = await b.client.xlen(f"{prefix_of(url)}:busy")
    assert 10 <= length < 200  # MAXLEN ~: trimmed to about 10, in whole macro nodes
    assert await b.client.xlen(f"{prefix_of(url)}:quiet") == 1
    await b.close()


async def test_a_group_shares_work_and_a_dead_consumers_pending_entries_are_claimed(broker, url) -> None:
    await broker.publish("d", [record("d", s) for s in range(1, 7)])
    dead = consumer(url, name="dead", claim_idle_ms=0)
    taken = await dead.read(count=4, block_ms=100)  # read, never acked: it "crashed"
    assert [d.seq for d in taken] == [1, 2, 3, 4]
    await dead.close()
    alive = consumer(url, name="alive", claim_idle_ms=0)
    claimed = await alive.read(count=10, block_ms=100)
    assert [d.seq for d in claimed] == [1, 2, 3, 4]  # XAUTOCLAIM first
    await alive.ack(claimed)
    rest = await alive.read(count=10, block_ms=100)
    assert [d.seq for d in rest] == [5, 6]
    await alive.ack(rest)
    assert await alive.read(count=10, block_ms=50) == []  # nothing pending, nothing new
    pending = await alive.client.xpending(alive.key, "g")
    assert pending["pending"] == 0
    await alive.close()


class _ListBroker:
    def __init__(self, url: str) -> None:
        self.url = url

    async def publish(self, device, records):  # pragma: no cover - not called
        return brokers.Published(len(records), 0)

    async def close(self) -> None:
        return None


def make_list_broker(url: str) -> _ListBroker:
    return _ListBroker(url)


def test_another_broker_plugs_in_by_dotted_path() -> None:
    b = broker_urls.open_broker("python:test_tunnel_redis:make_list_broker?x=1")
    assert isinstance(b, _ListBroker) and b.url.endswith("?x=1")


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("kafka://broker:9092", "no broker for scheme 'kafka'"),
        ("python:no_such_module_here:f", "cannot load broker factory"),
        ("redis://127.0.0.1:1/0?maxlen=0", "maxlen must be a positive integer"),
    ],
)
def test_an_unusable_tunnel_url_is_refused_naming_the_setting(url: str, text: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"tunnel_url: .*{text}"):
        broker_urls.open_broker(url)
