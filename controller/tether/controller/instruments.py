"""Prometheus metrics of a controller process and of an aggregation worker (`tether_controller_*`, `tether_worker_*`).

Every update on a hot path is O(1): a counter or histogram child resolved once
(labels are bound when a method handler is wrapped or when this object is
built, never per call), incremented under prometheus-client's own lock.
Values that already exist elsewhere (connected devices, the admission queue)
are read at scrape time by callbacks, so they cost nothing between scrapes;
the callbacks read plain attributes only (a scrape runs on the exposition's
thread) and a failing one reports NaN instead of failing the scrape.

The metric names, with what a dashboard asks of them, are listed in
docs/internals.md ("Metrics"); charts/tether/dashboards/tether.json plots them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping

import prometheus_client
from prometheus_client import multiprocess
from prometheus_client import registry as registry_mod

from tether.common import exposition

log = logging.getLogger(__name__)

# Unary RPCs of a healthy controller answer in milliseconds; a pull streams for seconds.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Server-streaming methods held open for a device's lifetime: their duration is a session, not a latency.
LONG_LIVED_METHODS = frozenset({"/tether.v1.DeviceService/Subscribe"})
REPORT_STATES = ("downloading", "installed", "running", "succeeded", "failed", "refused", "uninstalled")


def _safe(read: Callable[[], float]) -> Callable[[], float]:
    def value() -> float:
        try:
            return float(read())
        except Exception:  # a component shutting down under a scrape: report "unknown", never fail the scrape
            return math.nan

    return value


class ControllerMetrics:
    """The controller's instruments, in a registry of their own (`registry`)."""

    def __init__(self, registry: registry_mod.CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else exposition.new_registry()
        self.connected = prometheus_client.Gauge(
            "tether_controller_connected_agents", "Agents holding a Subscribe stream on this replica", registry=r
        )
        notifies = prometheus_client.Counter(
            "tether_controller_notifies", "Events pushed to connected agents, by kind", ["kind"], registry=r
        )
        self.notified = notifies.labels("notify")
        self.revoked = notifies.labels("revoke")
        self.dropped = notifies.labels("dropped_slow_device")
        pulls = prometheus_client.Counter(
            "tether_controller_pulls", "Blob pulls admitted and served, by method", ["method"], registry=r
        )
        self.pulls_blobs = pulls.labels("PullBlobs")
        self.pulls_blob = pulls.labels("PullBlob")
        self.bytes_served = prometheus_client.Counter(
            "tether_controller_blob_bytes_served", "Blob bytes streamed to agents (PullBlobs and PullBlob)", registry=r
        )
        reports = prometheus_client.Counter(
            "tether_controller_delivery_reports",
            "Delivery reports accepted, by state (installs by outcome: installed, failed, refused)",
            ["state"],
            registry=r,
        )
        self.reports = {state: reports.labels(state) for state in REPORT_STATES}
        self.results = prometheus_client.Counter(
            "tether_controller_results_uploaded", "Results accepted (duplicates not counted)", registry=r
        )
        self.url_failures = prometheus_client.Counter(
            "tether_controller_blob_url_failures",
            "Blob URLs that did not deliver, as agents report them (each then pulled over gRPC), by reason",
            ["reason"],
            registry=r,
        )
        tunnel = prometheus_client.Counter(
            "tether_controller_tunnel_records",
            "Real-time tunnel records from devices, by outcome (accepted, duplicate, refused)",
            ["outcome"],
            registry=r,
        )
        self.tunnel = {outcome: tunnel.labels(outcome) for outcome in ("accepted", "duplicate", "refused")}
        self.rpc_seconds = prometheus_client.Histogram(
            "tether_controller_rpc_duration_seconds",
            "Time from a request's arrival to its answer (streams: to their end), by method; Subscribe not included",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.pull_queue = prometheus_client.Gauge(
            "tether_controller_pull_queue_depth", "Pulls waiting for an admission slot", registry=r
        )
        self.pulls_active = prometheus_client.Gauge(
            "tether_controller_pulls_in_progress", "Pulls holding an admission slot", registry=r
        )
        self.replica_lag = prometheus_client.Histogram(
            "tether_controller_replica_fanout_lag_seconds",
            "A change made on another replica: from its announcement reaching this replica to its fan-out here",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.remote_changes = prometheus_client.Counter(
            "tether_controller_remote_changes", "Release changes fanned out on behalf of other replicas", registry=r
        )

    def rpc_timer(self, method: str) -> prometheus_client.Histogram | None:
        """The histogram child of one method (bound once, when its handler is wrapped); None: not timed."""
        return None if method in LONG_LIVED_METHODS else self.rpc_seconds.labels(method)

    def watch(
        self, *, connected: Callable[[], float], queued: Callable[[], float], active: Callable[[], float]
    ) -> None:
        """Gauges read at scrape time from the hub and the admission gate."""
        self.connected.set_function(_safe(connected))
        self.pull_queue.set_function(_safe(queued))
        self.pulls_active.set_function(_safe(active))

    def report(self, state: str) -> None:
        counter = self.reports.get(state)
        if counter is not None:
            counter.inc()

    def url_failed(self, counts: Mapping[str, int]) -> None:
        for reason, n in counts.items():
            self.url_failures.labels(reason).inc(n)


class WorkerMetrics:
    """The aggregation worker's instruments (`tether_worker_*`)."""

    def __init__(self, registry: registry_mod.CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self.aggregations = prometheus_client.Counter(
            "tether_worker_aggregations",
            "Aggregation rounds by outcome (folded, unchanged, no-release, failed, retried)",
            ["outcome"],
            registry=r,
        )
        self.results_folded = prometheus_client.Counter(
            "tether_worker_results_folded", "Results folded into aggregates", registry=r
        )
        self.results_rejected = prometheus_client.Counter(
            "tether_worker_results_rejected", "Results an aggregation refused (shape or type mismatch)", registry=r
        )
        self.duration = prometheus_client.Histogram(
            "tether_worker_aggregation_duration_seconds",
            "Time of one aggregation round",
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.ingestion_lag = prometheus_client.Histogram(
            "tether_worker_ingestion_lag_seconds",
            "Lag behind ingestion: from the oldest result a round folded being stored to the round's commit",
            buckets=LAG_BUCKETS,
            registry=r,
        )


def worker_registry() -> registry_mod.CollectorRegistry:
    """What `tether worker --metrics-port` serves: the process's registry, or the sum of a prefork pool's children."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return prometheus_client.REGISTRY
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry
