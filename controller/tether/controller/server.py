"""Start and stop a controller process: migrations, pool, blob store, gRPC server.

`start_controller` returns once the port is bound and serving, with the port
actually bound (port 0 picks a free one: tests and `tether demo` use that).
The standard gRPC health service (`grpc.health.v1.Health`, unauthenticated)
answers SERVING for the whole server ("") and each Tether service once the
port serves; `stop` marks them NOT_SERVING first, so probes and load
balancers stop sending work. `stop` ends every agent stream next (they
reconnect and resync elsewhere), then lets in-flight unary calls finish within the grace period, then closes
the pool and the broker connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tether.common import config as config_mod
from tether.common import errors, exposition, signing, tls
from tether.controller import (
    admin_service,
    admission,
    blobs,
    blobstores,
    db,
    delivery_reports,
    device_auth,
    device_service,
    edge,
    fanout,
    hub,
    instruments,
    release_cache,
    replicas,
    round_updates,
    stats,
)
from tether.controller import round_driver as round_driver_mod
from tether.controller.enqueue import CeleryEnqueuer, Enqueuer
from tether.controller.fl import intake
from tether.controller.storage import contracts, postgres
from tether.controller.tunnel import broker_urls, brokers, tunnel_service
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.proto.v1 import tunnel_pb2_grpc
from tether.spec import emits

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

DRIVER_STOP_S = 5.0  # how long a stop waits for the round driver's pass in progress

MAX_STREAMS_PER_CONNECTION = 100
# What the health service reports on: "" is the whole server (what probes ask by default).
HEALTH_SERVICES = (
    health.OVERALL_HEALTH,
    "tether.v1.DeviceService",
    "tether.v1.AdminService",
    "tether.v1.StatsService",
    "tether.v1.TunnelService",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunningController:
    """A started controller. `address` is what a client on this machine dials."""

    host: str
    port: int
    config: config_mod.ControllerConfig
    server: grpc.aio.Server
    pool: AsyncConnectionPool
    storage: contracts.Storage
    releases: release_cache.ReleaseCache  # releases as this process reads them (and its "may read" answers)
    blobs: blobs.BlobStore | blobstores.BlobBackend  # as given or configured
    hub: hub.Hub
    enqueuer: Enqueuer
    # This process among the replicas sharing the database, and what it counts.
    replica_id: str = ""
    listener: replicas.ReleaseListener | None = None
    counters: stats.RpcCounters | None = None
    authenticator: device_auth.DeviceAuthenticator | None = None  # device credentials
    reporter: delivery_reports.DeliveryReporter | None = None  # group-committed delivery reports
    blob_backend: blobstores.BlobBackend | None = None  # what the services use (`blobs` in threads, or itself)
    metrics: instruments.ControllerMetrics | None = None  # Prometheus instruments (its own registry)
    metrics_server: exposition.MetricsServer | None = None  # /metrics, when cfg.metrics_port is set
    health: health.aio.HealthServicer | None = None  # grpc.health.v1.Health on the main (and health) port
    health_server: grpc.aio.Server | None = None  # plaintext Health-only port, when cfg.health_port is set
    health_port: int | None = None
    round_driver: round_driver_mod.RoundDriver | None = None  # federated rounds (tether.controller.round_driver)
    round_driver_task: asyncio.Task[None] | None = None
    tunnel: tunnel_service.TunnelService | None = None  # the real-time tunnel (its broker closes with us)

    @property
    def address(self) -> str:
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return config_mod.join_host_port(dial, self.port)

    @property
    def listen_address(self) -> str:
        return config_mod.join_host_port(self.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call twice."""
        grace_s = self.config.grace_s if grace is None else grace
        if self.health is not None:  # probes and balancers see NOT_SERVING before the port closes
            await self.health.enter_graceful_shutdown()
        if self.round_driver_task is not None:
            if self.round_driver is not None:
                self.round_driver.stop()
            self.round_driver_task.cancel()
            # A pass blocked on a database that is gone must not hold the shutdown: wait a bounded time.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.round_driver_task), DRIVER_STOP_S)
        self.hub.close_all(reason="controller shutting down; reconnect")
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.listener is not None:
            await self.listener.stop()
        close = getattr(self.enqueuer, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:  # a broker that is gone must not prevent the rest of the shutdown
                log.warning("closing the enqueuer failed", exc_info=True)
        await self.pool.close()
        if self.blob_backend is not None:
            await self.blob_backend.close()
        if self.tunnel is not None and self.tunnel.broker is not None:
            try:
                await self.tunnel.broker.close()
            except Exception:
                log.warning("closing the tunnel broker failed", exc_info=True)
        if self.metrics_server is not None:  # last: a scrape during shutdown still gets an answer
            self.metrics_server.stop()
        log.info("controller on %s stopped", self.listen_address)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def server_options(cfg: config_mod.ControllerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Never share a port with a stale process (gRPC enables SO_REUSEPORT by default).
        ("grpc.so_reuseport", 0),
        # Detect dead agents on idle streams; accept agents' own keepalive pings.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Bounded state per connection: a device needs a stream and a few pulls. An L7 proxy that
        # multiplexes many devices opens more connections when it reaches this (HTTP/2 SETTINGS).
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ]


async def start_controller(
    cfg: config_mod.ControllerConfig,
    *,
    enqueuer: Enqueuer | None = None,
    blob_store: blobs.BlobStore | blobstores.BlobBackend | None = None,
    tunnel_broker: brokers.Broker | None = None,
    tunnel_limits: emits.TunnelLimits = emits.TunnelLimits(),
) -> RunningController:
    """Migrate the database, open the pool and serve on `cfg.listen`; return the running handle.

    The tunnel publishes to `tunnel_broker`, else to the broker `cfg.tunnel_url` names, else nowhere
    (Emit answers FAILED_PRECONDITION and devices keep their records).
    """
    if enqueuer is None:
        if not cfg.broker_url:
            raise config_mod.ConfigError("a broker URL is required (TETHER_BROKER_URL or --broker-url)")
        enqueuer = CeleryEnqueuer(cfg.broker_url)
    applied = await asyncio.to_thread(db.migrate, cfg.database_url)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    backend = blobstores.as_backend(blob_store) if blob_store is not None else await blobstores.open_backend(cfg)
    if blob_store is None:
        blob_store = backend.store if isinstance(backend, blobstores.LocalBackend) else backend
    replica_id = replicas.new_replica_id()
    # The pool's sessions carry the replica id, so the release trigger can say who changed a release.
    pool = await db.open_pool(
        replicas.with_origin(cfg.database_url, replica_id), min_size=cfg.pool_min_size, max_size=cfg.pool_max_size
    )
    listener: replicas.ReleaseListener | None = None
    metrics = instruments.ControllerMetrics()
    metrics_server: exposition.MetricsServer | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    try:
        storage = postgres.postgres_storage(pool)
        releases = release_cache.ReleaseCache(storage.releases)
        reporter = delivery_reports.DeliveryReporter(storage.releases)
        hub_ = hub.Hub(
            queue_size=cfg.device_queue_size, pull_rate=cfg.pull_rate, max_pull_spread_s=cfg.max_pull_spread_s
        )
        manifests = fanout.ManifestCache(bundles=storage.bundles, blob_store=backend)
        authenticator = device_auth.DeviceAuthenticator(
            registry=storage.devices,
            signer=await device_auth.signer_for(
                registry=storage.devices,
                key_file=str(cfg.credential_key_file) if cfg.credential_key_file else None,
                ttl_s=cfg.credential_ttl_s,
            ),
            cache_s=cfg.auth_cache_s,
        )
        fan_out = fanout.FanOut(
            hub_=hub_, storage=storage, manifests=manifests, authenticator=authenticator, metrics=metrics
        )
        bundle_policy = signing.BundlePolicy(
            require_signature=cfg.require_signed_bundles, trusted=signing.load_trusted_keys(cfg.trusted_key_files)
        )

        async def revoked(device_id: str) -> None:  # revoked anywhere, this replica included
            fan_out.device_revoked(device_id)

        async def device_changed(device_id: str, here: bool) -> None:  # new credential or facts, anywhere
            await fan_out.device_changed(device_id, here=here)

        listener = replicas.ReleaseListener(
            conninfo=cfg.database_url,
            cache=releases,
            replica_id=replica_id,
            on_change=fan_out.release_changed,  # a change made through another replica
            on_revoked=revoked,
            on_gap=fan_out.end_revoked_streams,  # (re)connected: revocations may have gone unheard meanwhile
            on_device_changed=device_changed,
            metrics=metrics,
        )
        rounds_driver = round_driver_mod.RoundDriver(
            storage=storage,
            releases_=releases,
            fan_out=fan_out,
            hub_=hub_,
            blob_store=backend,
            send_aggregate=_round_sender(enqueuer),
            lock=round_driver_mod.AdvisoryLock(pool),
            signing_key=_fl_signing_key(),
            interval_s=float(os.environ.get("TETHER_FL_DRIVER_INTERVAL", "1.0")),
        )
        round_intake = round_updates.UpdateIntake(
            storage=storage,
            blob_store=backend,
            max_update_bytes=int(os.environ.get("TETHER_FL_MAX_UPDATE_BYTES", str(intake.DEFAULT_MAX_UPDATE_BYTES))),
            on_ready=lambda task, number: _poke(rounds_driver),
        )
        counters = stats.RpcCounters(metrics=metrics)
        pull_gate = admission.FifoGate(cfg.max_concurrent_pulls, quantum_bytes=cfg.pull_quantum_bytes)
        metrics.watch(connected=lambda: len(hub_), queued=lambda: pull_gate.queued, active=lambda: pull_gate.active)
        # The edge: authentication and error mapping of every device and admin RPC (tether.controller.edge).
        server = grpc.aio.server(
            options=server_options(cfg),
            interceptors=[edge.Edge(authenticator=authenticator, admin_token=cfg.admin_token)],
        )
        counters.add_servicer(
            pb_grpc.add_DeviceServiceServicer_to_server,
            device_service.DeviceService(
                storage=storage,
                releases=releases,
                reporter=reporter,
                blob_store=backend,
                hub_=hub_,
                enqueuer=enqueuer,
                manifests=manifests,
                authenticator=authenticator,
                bootstrap_token=cfg.bootstrap_token,
                heartbeat_s=cfg.heartbeat_s,
                pull_gate=pull_gate,
                metrics=metrics,
                replica_id=replica_id,
                round_intake=round_intake,
            ),
            server,
        )
        counters.add_servicer(
            pb_grpc.add_AdminServiceServicer_to_server,
            admin_service.AdminService(
                storage=storage,
                releases_=releases,
                blob_store=backend,
                hub_=hub_,
                fan_out=fan_out,
                bundle_policy=bundle_policy,
                rounds=rounds_driver,
            ),
            server,
        )
        counters.add_servicer(
            pb_grpc.add_StatsServiceServicer_to_server,
            stats.StatsService(
                admin_token=cfg.admin_token,
                replica_id=replica_id,
                counters=counters,
                connected=lambda: len(hub_),
                remote_changes=lambda: listener.remote_changes if listener is not None else 0,
                dropped=lambda: hub_.dropped,
            ),
            server,
        )
        if tunnel_broker is None and cfg.tunnel_url:
            tunnel_broker = broker_urls.open_broker(cfg.tunnel_url)
        tunnel = tunnel_service.TunnelService(broker=tunnel_broker, limits=tunnel_limits, metrics=metrics)
        counters.add_servicer(tunnel_pb2_grpc.add_TunnelServiceServicer_to_server, tunnel, server)
        # grpc.health.v1.Health needs no token (the edge authenticates only Device and Admin services).
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        host, _ = config_mod.split_host_port(cfg.listen)
        port = _bind(server, cfg)
        if cfg.health_port is not None:
            health_server, health_port = _health_server(health_servicer, host=host, port=cfg.health_port)
        await listener.start()  # before serving: no device can connect before changes are heard
        if cfg.metrics_port is not None:
            metrics_server = exposition.serve(metrics.registry, port=cfg.metrics_port, host=cfg.metrics_host)
        await server.start()
        if health_server is not None:
            await health_server.start()
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        driver_task = asyncio.create_task(rounds_driver.run(), name="round-driver")
    except BaseException:
        if health_server is not None:
            await health_server.stop(0)
        if metrics_server is not None:
            metrics_server.stop()
        if listener is not None:
            await listener.stop()
        await pool.close()
        await backend.close()
        raise
    log.info("controller listening on %s", config_mod.join_host_port(host, port))
    return RunningController(
        host=host,
        port=port,
        config=cfg,
        server=server,
        pool=pool,
        storage=storage,
        releases=releases,
        blobs=blob_store,
        hub=hub_,
        enqueuer=enqueuer,
        replica_id=replica_id,
        listener=listener,
        counters=counters,
        authenticator=authenticator,
        reporter=reporter,
        blob_backend=backend,
        metrics=metrics,
        metrics_server=metrics_server,
        health=health_servicer,
        health_server=health_server,
        health_port=health_port,
        round_driver=rounds_driver,
        round_driver_task=driver_task,
        tunnel=tunnel,
    )


async def _poke(d: round_driver_mod.RoundDriver) -> None:
    d.poke()


def _round_sender(enqueuer: Enqueuer) -> Callable[[str, int], Awaitable[None]]:
    send = getattr(enqueuer, "enqueue_round", None)
    if send is not None:
        return send

    async def unsent(task: str, number: int) -> None:
        log.warning("round %d of %s is ready to aggregate, but the enqueuer cannot send rounds", number, task)

    return unsent


def _fl_signing_key() -> Ed25519PrivateKey | None:
    """The key derived federated bundle versions are signed with (TETHER_FL_SIGNING_KEY), if any."""
    path = os.environ.get("TETHER_FL_SIGNING_KEY")
    return signing.load_private_key(path) if path else None


def _health_server(servicer: health.aio.HealthServicer, *, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only the Health service: what kubelet's `grpc:` probe can reach."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = config_mod.join_host_port(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise errors.FailedPrecondition(f"cannot serve health checks on {address}: {e}") from None
    if bound == 0:
        raise errors.FailedPrecondition(f"cannot serve health checks on {address}")
    return server, bound


def _bind(server: grpc.aio.Server, cfg: config_mod.ControllerConfig) -> int:
    try:
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            credentials = tls.server_credentials(
                cert_file=cfg.tls_cert_file, key_file=cfg.tls_key_file, client_ca_file=cfg.tls_client_ca_file
            )
            port = server.add_secure_port(cfg.listen, credentials)
        else:
            port = server.add_insecure_port(cfg.listen)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        raise errors.FailedPrecondition(f"cannot listen on {cfg.listen}: {e}") from None
    if port == 0:
        raise errors.FailedPrecondition(f"cannot listen on {cfg.listen}")
    return port
