"""Which broker a tunnel URL names: built-in schemes, entry points, or a dotted path.

Plugging in another broker: give the controller `--tunnel-url SCHEME://...`
(or TETHER_TUNNEL_URL) where SCHEME is registered in the entry-point group
`tether.tunnel_brokers` as a callable `factory(url) -> brokers.Broker`
(in your package's pyproject.toml: `[project.entry-points."tether.tunnel_brokers"]
kafka = "mypkg.tunnel:KafkaBroker.from_url"`), or
`python:package.module:factory?...` naming the factory directly. The factory
gets the whole URL. `redis://`, `rediss://` and `unix://` are Redis Streams
(`redis_streams`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable

from tether.common import errors
from tether.controller.tunnel import brokers

ENTRY_POINT_GROUP = "tether.tunnel_brokers"

BrokerFactory = Callable[[str], brokers.Broker]


def _factory(url: str) -> BrokerFactory:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from tether.controller.tunnel import redis_streams

        return redis_streams.RedisStreamsBroker.from_url
    if scheme == "python":
        target = url[len("python:") :].split("?", 1)[0]
        module_name, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise errors.InvalidArgument(f"tunnel_url: cannot load broker factory {target!r}: {e}") from None
        if not callable(factory):
            raise errors.InvalidArgument(f"tunnel_url: {target!r} is not callable")
        return factory
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == scheme:
            return entry.load()
    raise errors.InvalidArgument(
        f"tunnel_url: no broker for scheme {scheme!r} (built in: redis, rediss, unix; others through the "
        f"{ENTRY_POINT_GROUP!r} entry points or python:module:factory)"
    )


def open_broker(url: str) -> brokers.Broker:
    """The broker `url` names (see the module docstring); InvalidArgument naming `tunnel_url` otherwise."""
    return _factory(url)(url)
