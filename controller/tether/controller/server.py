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
from typing import TYPE_CHECKING

import grpc

from tether.common import config as config_mod
from tether.common import errors
from tether.controller import blobs, db, hub, service, store
from tether.controller.enqueue import CeleryEnqueuer, Enqueuer
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)


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
    pool = await db.open_pool(cfg.database_url, min_size=cfg.pool_min_size, max_size=cfg.pool_max_size)
    try:
        store_ = store.Store(pool)
        hub_ = hub.Hub(queue_size=cfg.device_queue_size)
        manifests = service.ManifestCache(store_=store_)
        server = grpc.aio.server(options=server_options(cfg))
        pb_grpc.add_DeviceServiceServicer_to_server(
            service.DeviceService(
                store_=store_,
                blob_store=blob_store,
                hub_=hub_,
                enqueuer=enqueuer,
                manifests=manifests,
                bootstrap_token=cfg.bootstrap_token,
                heartbeat_s=cfg.heartbeat_s,
            ),
            server,
        )
        pb_grpc.add_AdminServiceServicer_to_server(
            service.AdminService(store_=store_, blob_store=blob_store, hub_=hub_, admin_token=cfg.admin_token),
            server,
        )
        host, _ = config_mod.split_host_port(cfg.listen)
        port = _bind(server, cfg)
        await server.start()
    except BaseException:
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
    )


def _bind(server: grpc.aio.Server, cfg: config_mod.ControllerConfig) -> int:
    try:
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials([(cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes())])
            port = server.add_secure_port(cfg.listen, credentials)
        else:
            port = server.add_insecure_port(cfg.listen)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        raise errors.FailedPrecondition(f"cannot listen on {cfg.listen}: {e}") from None
    if port == 0:
        raise errors.FailedPrecondition(f"cannot listen on {cfg.listen}")
    return port
