"""`tether controller`: run the controller until SIGTERM / SIGINT, then stop gracefully.

When it is ready it prints exactly one line, `controller listening on HOST:PORT`,
to stdout (flushed): `tether demo`, the e2e harness and readiness scripts wait
for it. Everything else goes to the log (stderr).
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys

import click
import psycopg
import psycopg_pool

from tether.common import config, errors, exposition, rlimits, tls, tracing

READY_PREFIX = "controller listening on "


@click.command("controller")
@click.option("--listen", default=config.DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve gRPC on.")
@click.option("--database-url", envvar=config.ENV_DATABASE_URL, help="PostgreSQL URL [env TETHER_DATABASE_URL].")
@click.option("--broker-url", envvar=config.ENV_BROKER_URL, help="Celery broker URL [env TETHER_BROKER_URL].")
@click.option(
    "--blob-dir",
    envvar=config.ENV_BLOB_DIR,
    default=config.DEFAULT_BLOB_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    help="Blob store directory [env TETHER_BLOB_DIR].",
)
@click.option(
    "--blob-store",
    envvar=config.ENV_BLOB_STORE,
    default="fs",
    show_default=True,
    help="Where blobs live: fs (--blob-dir), http (--blob-dir, served by a web server or CDN under "
    "--blob-base-url) or s3://bucket[/prefix] (S3-compatible; credentials from the usual AWS sources) "
    f"[env {config.ENV_BLOB_STORE}].",
)
@click.option(
    "--blob-base-url",
    envvar=config.ENV_BLOB_BASE_URL,
    help="Devices fetch blobs under this URL with signed per-device URLs (nginx secure_link; with s3://, "
    f"a CDN in front of the bucket) [env {config.ENV_BLOB_BASE_URL}].",
)
@click.option(
    "--blob-url-secret-file",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help=f"File holding the secret blob URLs are signed with (or env {config.ENV_BLOB_URL_SECRET}).",
)
@click.option(
    "--blob-url-ttl",
    envvar=config.ENV_BLOB_URL_TTL,
    type=click.IntRange(60, 7 * 24 * 3600),
    default=900,
    show_default=True,
    help=f"Seconds a blob URL handed to a device stays valid [env {config.ENV_BLOB_URL_TTL}].",
)
@click.option("--s3-endpoint", envvar=config.ENV_S3_ENDPOINT, help="S3 endpoint URL (MinIO, Ceph, ...).")
@click.option("--s3-region", envvar=config.ENV_S3_REGION, help="S3 region (default: botocore's).")
@click.option("--admin-token", envvar=config.ENV_ADMIN_TOKEN, help="Admin API token [env TETHER_ADMIN_TOKEN].")
@click.option(
    "--bootstrap-token", envvar=config.ENV_BOOTSTRAP_TOKEN, help="Enrolment token [env TETHER_BOOTSTRAP_TOKEN]."
)
@click.option("--grace", default=5.0, show_default=True, help="Seconds in-flight calls get to finish at stop.")
@click.option("--heartbeat", default=30.0, show_default=True, help="Seconds between heartbeats on idle streams.")
@click.option(
    "--tls-cert",
    envvar=tls.ENV_TLS_CERT,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help=f"PEM server certificate: serve TLS [env {tls.ENV_TLS_CERT}].",
)
@click.option(
    "--tls-key",
    envvar=tls.ENV_TLS_KEY,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help=f"PEM server private key [env {tls.ENV_TLS_KEY}].",
)
@click.option(
    "--tls-client-ca",
    envvar=tls.ENV_TLS_CLIENT_CA,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help=f"PEM CA: require every client to present a certificate it signed (mTLS) [env {tls.ENV_TLS_CLIENT_CA}].",
)
@click.option(
    "--credential-key-file",
    envvar="TETHER_CREDENTIAL_KEY_FILE",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="Keys that sign device credentials, one per line, the first signs (default: a key kept in "
    "PostgreSQL, shared by all replicas) [env TETHER_CREDENTIAL_KEY_FILE].",
)
@click.option(
    "--credential-ttl",
    envvar="TETHER_CREDENTIAL_TTL",
    type=click.IntRange(60, 366 * 24 * 3600),
    default=7 * 24 * 3600,
    show_default=True,
    help="Seconds a device credential is valid; agents renew it before then [env TETHER_CREDENTIAL_TTL].",
)
@click.option(
    "--require-signed-bundles",
    envvar="TETHER_REQUIRE_SIGNED_BUNDLES",
    is_flag=True,
    help="Refuse unsigned bundle manifests at upload [env TETHER_REQUIRE_SIGNED_BUNDLES].",
)
@click.option(
    "--pull-rate",
    envvar="TETHER_PULL_RATE",
    type=click.FloatRange(min=0),
    default=500.0,
    show_default=True,
    help="Installs per second a push plans for: N devices told at once start pulling within N / rate "
    "seconds (Notify.pull_spread_ms); 0 = all at once [env TETHER_PULL_RATE].",
)
@click.option(
    "--max-concurrent-pulls",
    envvar="TETHER_MAX_CONCURRENT_PULLS",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Blob pulls streamed at once; more wait their turn in arrival order [env TETHER_MAX_CONCURRENT_PULLS].",
)
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="Ed25519 public key (PEM) whose bundle signatures are accepted at upload; repeatable. "
    "With any, a signature by another key is refused.",
)
@click.option(
    "--health-port",
    type=click.IntRange(min=1, max=65535),
    envvar="TETHER_HEALTH_PORT",
    default=None,
    help="Also serve grpc.health.v1.Health alone, in plaintext, on this port: for kubelet's grpc probe, "
    "which speaks no TLS (env TETHER_HEALTH_PORT). The main port serves Health too.",
)
@click.option(
    "--tunnel-url",
    envvar=config.ENV_TUNNEL_URL,
    default=None,
    help="Broker of the real-time tunnel (ctx.emit): redis://HOST:PORT/DB[?maxlen=N], or a plugged-in "
    "broker (docs/internals.md, 'Real-time tunnel'); unset: emits wait in the devices' outboxes "
    "[env TETHER_TUNNEL_URL].",
)
@exposition.metrics_port_option("tether_controller_*")
def controller(
    listen: str,
    database_url: str | None,
    broker_url: str | None,
    blob_dir: pathlib.Path,
    blob_store: str,
    blob_base_url: str | None,
    blob_url_secret_file: pathlib.Path | None,
    blob_url_ttl: int,
    s3_endpoint: str | None,
    s3_region: str | None,
    admin_token: str | None,
    bootstrap_token: str | None,
    grace: float,
    heartbeat: float,
    tls_cert: pathlib.Path | None,
    tls_key: pathlib.Path | None,
    tls_client_ca: pathlib.Path | None,
    credential_key_file: pathlib.Path | None,
    credential_ttl: int,
    require_signed_bundles: bool,
    pull_rate: float,
    max_concurrent_pulls: int,
    trust_keys: tuple[pathlib.Path, ...],
    health_port: int | None,
    tunnel_url: str | None,
    metrics_port: int,
) -> None:
    """Run the controller (gRPC distribution service, device registry, result ingestion)."""
    try:
        secret = None
        if blob_url_secret_file is not None:
            try:
                secret = blob_url_secret_file.read_text().strip()
            except OSError as e:
                raise click.BadParameter(str(e), param_hint="--blob-url-secret-file") from None
        cfg = config.ControllerConfig.from_env(
            listen=listen,
            database_url=database_url,
            broker_url=broker_url,
            tunnel_url=tunnel_url,
            blob_dir=blob_dir,
            blob_store=blob_store,
            blob_base_url=blob_base_url,
            blob_url_secret=secret,
            blob_url_ttl_s=blob_url_ttl,
            s3_endpoint_url=s3_endpoint,
            s3_region=s3_region,
            admin_token=admin_token,
            bootstrap_token=bootstrap_token,
            grace_s=grace,
            heartbeat_s=heartbeat,
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
            tls_client_ca_file=tls_client_ca,
            credential_key_file=credential_key_file,
            credential_ttl_s=credential_ttl,
            require_signed_bundles=require_signed_bundles,
            trusted_key_files=tuple(trust_keys),
            pull_rate=pull_rate,
            max_concurrent_pulls=max_concurrent_pulls,
            metrics_port=metrics_port or None,
            health_port=health_port,
        )
        asyncio.run(_serve(cfg))
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
        raise click.ClickException(f"cannot use the database: {e}") from None


async def _serve(cfg: config.ControllerConfig) -> None:
    from tether.controller.server import start_controller

    rlimits.raise_open_files_limit()  # one descriptor per connected agent
    # OTEL_* (off unless an exporter or endpoint is named), with OTel's gRPC server, Celery and psycopg spans.
    tracing.configure("tether-controller", instrument_=("grpc-server", "celery", "psycopg"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_controller(cfg)
    click.echo(READY_PREFIX + running.listen_address)
    sys.stdout.flush()  # the ready line must reach a parent reading our stdout now
    try:
        await stop.wait()
    finally:
        await running.stop()
