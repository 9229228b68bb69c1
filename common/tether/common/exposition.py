"""Serve a Prometheus registry on `/metrics` (controller, operator, worker: `--metrics-port`).

Each component keeps its metrics in a registry of its own (not prometheus-client's
global one), so several components in one process — tests, `tether demo` — never
collide, and a scrape reads only that component. The HTTP server is
prometheus-client's own (a thread per scrape, off the event loop): a scrape
never waits for the component's loop, and the component never waits for a scrape.

A scrape during shutdown: the server is stopped last, after the component, and
collection only reads in-memory values, so it answers or the connection is
refused; it never raises into the component. `stop` is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import click
import prometheus_client
from prometheus_client import registry as registry_mod

from tether.common import errors

log = logging.getLogger(__name__)

ENV_METRICS_PORT = "TETHER_METRICS_PORT"
F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(kw_only=True)
class MetricsServer:
    host: str
    port: int  # the port bound (0 asked picks a free one)
    _server: WSGIServer
    _thread: threading.Thread
    _stopped: bool = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self._server.shutdown()
            self._server.server_close()
        except OSError as e:  # a socket already gone: nothing left to release
            log.warning("closing the metrics server on port %d: %s", self.port, e)
        self._thread.join(timeout=5)


def serve(registry: registry_mod.CollectorRegistry, *, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` on http://host:port/metrics (port 0: a free one); refuses a port it cannot bind."""
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise errors.FailedPrecondition(f"cannot serve metrics on {host}:{port}: {e}") from None
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host=host, port=bound, _server=server, _thread=thread)


def new_registry() -> registry_mod.CollectorRegistry:
    """A registry with the process collectors (CPU, memory, descriptors; Python's GC and version)."""
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


def metrics_port_option(default_help: str) -> Callable[[F], F]:
    """`--metrics-port` (env TETHER_METRICS_PORT): 0, the default, serves nothing."""
    return click.option(
        "--metrics-port",
        envvar=ENV_METRICS_PORT,
        type=click.IntRange(min=0, max=65535),
        default=0,
        show_default=True,
        help=f"Serve Prometheus metrics ({default_help}) on http://0.0.0.0:PORT/metrics; 0 = off "
        f"[env {ENV_METRICS_PORT}].",
    )
