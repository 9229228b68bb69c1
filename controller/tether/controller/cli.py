"""`tether controller`: run the controller until SIGTERM / SIGINT, then stop gracefully.

When it is ready it prints exactly one line, `controller listening on HOST:PORT`,
to stdout (flushed): `tether demo`, the e2e harness and readiness scripts wait
for it. Everything else goes to the log (stderr).
"""

from __future__ import annotations

import asyncio
import pathlib
import signal

import click
import psycopg
import psycopg_pool

from tether.common import config as config_mod
from tether.common import errors

READY_PREFIX = "controller listening on "


@click.command("controller")
@click.option("--listen", default=config_mod.DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve gRPC on.")
@click.option("--database-url", envvar=config_mod.ENV_DATABASE_URL, help="PostgreSQL URL [env TETHER_DATABASE_URL].")
@click.option("--broker-url", envvar=config_mod.ENV_BROKER_URL, help="Celery broker URL [env TETHER_BROKER_URL].")
@click.option(
    "--blob-dir",
    envvar=config_mod.ENV_BLOB_DIR,
    default=config_mod.DEFAULT_BLOB_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    help="Blob store directory [env TETHER_BLOB_DIR].",
)
@click.option("--admin-token", envvar=config_mod.ENV_ADMIN_TOKEN, help="Admin API token [env TETHER_ADMIN_TOKEN].")
@click.option(
    "--bootstrap-token", envvar=config_mod.ENV_BOOTSTRAP_TOKEN, help="Enrolment token [env TETHER_BOOTSTRAP_TOKEN]."
)
@click.option("--grace", default=5.0, show_default=True, help="Seconds in-flight calls get to finish at stop.")
@click.option("--heartbeat", default=30.0, show_default=True, help="Seconds between heartbeats on idle streams.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="PEM server certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="PEM server private key.")
def controller(
    listen: str,
    database_url: str | None,
    broker_url: str | None,
    blob_dir: pathlib.Path,
    admin_token: str | None,
    bootstrap_token: str | None,
    grace: float,
    heartbeat: float,
    tls_cert: pathlib.Path | None,
    tls_key: pathlib.Path | None,
) -> None:
    """Run the controller (gRPC distribution service, device registry, result ingestion)."""
    try:
        cfg = config_mod.ControllerConfig.from_env(
            listen=listen,
            database_url=database_url,
            broker_url=broker_url,
            blob_dir=blob_dir,
            admin_token=admin_token,
            bootstrap_token=bootstrap_token,
            grace_s=grace,
            heartbeat_s=heartbeat,
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
        )
        asyncio.run(_serve(cfg))
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
        raise click.ClickException(f"cannot use the database: {e}") from None


async def _serve(cfg: config_mod.ControllerConfig) -> None:
    from tether.controller.server import start_controller

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_controller(cfg)
    click.echo(READY_PREFIX + running.listen_address)
    click.get_text_stream("stdout").flush()
    try:
        await stop.wait()
    finally:
        await running.stop()
