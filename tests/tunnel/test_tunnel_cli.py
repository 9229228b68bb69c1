"""`tether tunnel tail TOPIC` against a real redis-server: what a user sees."""

from __future__ import annotations

import asyncio
import base64
import json

from click.testing import CliRunner
from tunnel_helpers import record, tunnel_url

from tether.cli.main import cli
from tether.controller.tunnel import broker_urls


def _publish(url: str, records) -> None:
    async def go() -> None:
        broker = broker_urls.open_broker(url)
        await broker.publish(records[0].device, records)
        await broker.close()

    asyncio.run(go())


def test_tail_prints_the_records_of_a_topic_from_the_start(broker_url) -> None:
    url = tunnel_url(broker_url)
    _publish(url, [record("phone-1", 1, payload=b'{"i": 1}'), record("phone-1", 2, payload=b"\xff\x00")])
    _publish(url, [record("phone-1", 3, topic="other")])
    result = CliRunner().invoke(cli, ["tunnel", "tail", "clicks", "--url", url, "--from-start", "--count", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith('phone-1 #1 ns/t {"i": 1}')
    assert lines[1].endswith("phone-1 #2 ns/t base64:/wA=")  # not UTF-8: shown as base64


def test_tail_as_json_and_a_bad_topic_is_refused(broker_url) -> None:
    url = tunnel_url(broker_url)
    _publish(url, [record("phone-2", 5, payload=b"abc")])
    result = CliRunner().invoke(
        cli, ["tunnel", "tail", "clicks", "--url", url, "--from-start", "--count", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["device"], doc["seq"], doc["key"]) == ("phone-2", 5, "phone-2:5")
    assert base64.b64decode(doc["payload"]) == b"abc"
    bad = CliRunner().invoke(cli, ["tunnel", "tail", "no spaces", "--url", url, "--count", "1"])
    assert bad.exit_code == 2 and "topic: " in bad.output
