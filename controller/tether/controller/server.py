"""Start and stop a controller process: migrations, pool, blob store, gRPC server.

`start_controller` returns once the port is bound and serving, with the port
actually bound (port 0 picks a free one: tests and `tether demo` use that).
`stop` ends every agent stream first (they reconnect and resync elsewhere),
then lets in-flight unary calls finish within the grace period, then closes
the pool and the broker connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grpc

from tether.common import config as config_mod
from tether.common import errors, signing, tls
from tether.controller import admission, blobs, db, device_auth, hub, replicas, service, stats, store
from tether.controller.enqueue import CeleryEnqueuer, Enqueuer
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunningController:
    """A started controller. `address` is what a client on this machine dials."""

    host: str
    port: int
    config: config_mod.ControllerConfig
    server: grpc.aio.Server
    pool: AsyncConnectionPool
    store: store.Store
    blobs: blobs.BlobStore
    hub: hub.Hub
    enqueuer: Enqueuer
    # This process among the replicas sharing the database, and what it counts.
    replica_id: str = ""
    listener: replicas.ReleaseListener | None = None
    counters: stats.RpcCounters | None = None
    authenticator: device_auth.DeviceAuthenticator | None = None  # device credentials

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
        self.hub.close_all(reason="controller shutting down; reconnect")
        await self.server.stop(grace_s)
        if self.listener is not None:
            await self.listener.stop()
        close = getattr(self.enqueuer, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:  # a broker that is gone must not prevent the rest of the shutdown
                log.warning("closing the enqueuer failed", exc_info=True)
        await self.pool.close()
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
    blob_store: blobs.BlobStore | None = None,
) -> RunningController:
    """Migrate the database, open the pool and serve on `cfg.listen`; return the running handle."""
    if enqueuer is None:
        if not cfg.broker_url:
            raise config_mod.ConfigError("a broker URL is required (TETHER_BROKER_URL or --broker-url)")
        enqueuer = CeleryEnqueuer(cfg.broker_url)
    applied = await asyncio.to_thread(db.migrate, cfg.database_url)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    blob_store = blob_store or blobs.FilesystemBlobStore(cfg.blob_dir, max_blob_bytes=cfg.max_blob_bytes)
    replica_id = replicas.new_replica_id()
    # The pool's sessions carry the replica id, so the release trigger can say who changed a release.
    pool = await db.open_pool(
        replicas.with_origin(cfg.database_url, replica_id), min_size=cfg.pool_min_size, max_size=cfg.pool_max_size
    )
    listener: replicas.ReleaseListener | None = None
    try:
        store_ = store.Store(pool)
        hub_ = hub.Hub(
            queue_size=cfg.device_queue_size, pull_rate=cfg.pull_rate, max_pull_spread_s=cfg.max_pull_spread_s
        )
        manifests = service.ManifestCache(store_=store_, blob_store=blob_store)
        authenticator = device_auth.DeviceAuthenticator(
            store_=store_,
            signer=await device_auth.signer_for(
                store_=store_,
                key_file=str(cfg.credential_key_file) if cfg.credential_key_file else None,
                ttl_s=cfg.credential_ttl_s,
            ),
            cache_s=cfg.auth_cache_s,
        )
        bundle_policy = signing.BundlePolicy(
            require_signature=cfg.require_signed_bundles, trusted=signing.load_trusted_keys(cfg.trusted_key_files)
        )

        async def fan_out(before: Any, after: Any) -> None:  # a change made through another replica
            await service._notify(hub_=hub_, store_=store_, manifests=manifests, before=before, after=after)

        async def revoked(device_id: str) -> None:  # revoked anywhere, this replica included
            service.end_revoked_device(hub_=hub_, authenticator=authenticator, device_id=device_id)

        async def device_changed(device_id: str, here: bool) -> None:  # new credential or facts, anywhere
            authenticator.forget(device_id)  # its cached entry holds the old facts (and secret)
            if not here and hub_.is_connected(device_id):  # this replica changed its own stream's facts already
                device = await store_.device(device_id)
                if device is not None:
                    hub_.update_facts(device_id=device_id, facts=device.facts)

        async def gap() -> None:  # (re)connected: revocations may have gone unheard meanwhile
            await service.end_revoked_streams(hub_=hub_, store_=store_, authenticator=authenticator)

        listener = replicas.ReleaseListener(
            conninfo=cfg.database_url,
            store_=store_,
            replica_id=replica_id,
            on_change=fan_out,
            on_revoked=revoked,
            on_gap=gap,
            on_device_changed=device_changed,
        )
        counters = stats.RpcCounters()
        server = grpc.aio.server(options=server_options(cfg))
        counters.add_servicer(
            pb_grpc.add_DeviceServiceServicer_to_server,
            service.DeviceService(
                store_=store_,
                blob_store=blob_store,
                hub_=hub_,
                enqueuer=enqueuer,
                manifests=manifests,
                bootstrap_token=cfg.bootstrap_token,
                heartbeat_s=cfg.heartbeat_s,
                authenticator=authenticator,
                pull_gate=admission.FifoGate(cfg.max_concurrent_pulls, quantum_bytes=cfg.pull_quantum_bytes),
            ),
            server,
        )
        counters.add_servicer(
            pb_grpc.add_AdminServiceServicer_to_server,
            service.AdminService(
                store_=store_,
                blob_store=blob_store,
                hub_=hub_,
                admin_token=cfg.admin_token,
                authenticator=authenticator,
                bundle_policy=bundle_policy,
                manifests=manifests,
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
        host, _ = config_mod.split_host_port(cfg.listen)
        port = _bind(server, cfg)
        await listener.start()  # before serving: no device can connect before changes are heard
        await server.start()
    except BaseException:
        if listener is not None:
            await listener.stop()
        await pool.close()
        raise
    log.info("controller listening on %s", config_mod.join_host_port(host, port))
    return RunningController(
        host=host,
        port=port,
        config=cfg,
        server=server,
        pool=pool,
        store=store_,
        blobs=blob_store,
        hub=hub_,
        enqueuer=enqueuer,
        replica_id=replica_id,
        listener=listener,
        counters=counters,
        authenticator=authenticator,
    )


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
