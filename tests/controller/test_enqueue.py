"""CeleryEnqueuer publishes `tether.aggregate` by name onto a real Redis broker."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from tether.controller.enqueue import AGGREGATE_TASK, CeleryEnqueuer, EnqueueFailed, Enqueuer


async def test_publishes_the_documented_message(broker_url):
    client = redis.Redis.from_url(broker_url)
    client.delete("celery")
    enqueuer = CeleryEnqueuer(broker_url)
    assert isinstance(enqueuer, Enqueuer)
    try:
        await enqueuer.enqueue(release="ns/task", version=3)
    finally:
        await enqueuer.close()
    [raw] = client.lrange("celery", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == AGGREGATE_TASK
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([], {"release": "ns/task", "version": 3})
    client.delete("celery")


async def test_an_unreachable_broker_raises_enqueue_failed_quickly():
    enqueuer = CeleryEnqueuer("redis://127.0.0.1:9/0", publish_retries=1, connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(EnqueueFailed) as info:
        await enqueuer.enqueue(release="ns/task", version=1)
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 15
    await enqueuer.close()
