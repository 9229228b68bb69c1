"""`tether worker`: run a Celery aggregation worker (a real `celery worker`).

Applies pending database migrations before it consumes anything, then hands
over to Celery. Prints `worker ready` on stdout once it consumes, so scripts
and tests can wait for that line.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import click


def _migrate(database_url: str, *, wait_s: float) -> list[str]:
    """Apply migrations, waiting up to `wait_s` for the database to accept connections."""
    import psycopg

    from tether.controller import db

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return db.migrate(database_url)
        except psycopg.OperationalError as e:
            if time.monotonic() >= deadline:
                raise click.ClickException(f"database not reachable: {e}") from e
            time.sleep(1)


@click.command()
@click.option("--broker-url", envvar="TETHER_BROKER_URL", required=True, help="Celery broker (redis://...).")
@click.option("--database-url", envvar="TETHER_DATABASE_URL", required=True, help="PostgreSQL conninfo.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option(
    "--pool",
    type=click.Choice(["auto", "solo", "prefork"]),
    default="auto",
    show_default=True,
    help="Execution pool; auto is solo for one process, prefork for more.",
)
@click.option("--queues", "-Q", default="celery", show_default=True, help="Comma-separated queues to consume.")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Celery log level.")
@click.option("--hostname", "-n", default=None, help="Node name (default tether-worker@<host>).")
@click.option("--migrate-wait", type=float, default=60, show_default=True, help="Seconds to wait for the database.")
@click.option(
    "--metrics-port",
    envvar="TETHER_METRICS_PORT",
    type=click.IntRange(min=0, max=65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics (tether_worker_*) on http://0.0.0.0:PORT/metrics; 0 = off "
    "[env TETHER_METRICS_PORT].",
)
def worker(
    broker_url: str,
    database_url: str,
    concurrency: int,
    pool: str,
    queues: str,
    loglevel: str,
    hostname: str | None,
    migrate_wait: float,
    metrics_port: int,
) -> None:
    """Run a Celery aggregation worker (task `tether.aggregate`)."""
    # The environment is how a prefork child (and the task's lazily created pool) finds them.
    os.environ["TETHER_BROKER_URL"] = broker_url
    os.environ["TETHER_DATABASE_URL"] = database_url
    applied = _migrate(database_url, wait_s=migrate_wait)
    if applied:
        click.echo(f"applied migrations: {', '.join(applied)}", err=True)

    if pool == "auto":
        pool = "solo" if concurrency == 1 else "prefork"
    if metrics_port and pool == "prefork" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus-client is first imported: every child then writes its values there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tether-worker-metrics-")

    from tether.common import errors, exposition
    from tether.controller import instruments, tasks

    tasks.app.conf.broker_url = broker_url
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--hostname={hostname or 'tether-worker@' + socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
    ]
    server = None
    if metrics_port:
        try:
            server = exposition.serve(instruments.worker_registry(), port=metrics_port)
        except errors.TetherError as e:
            raise click.ClickException(str(e)) from None
    try:
        tasks.app.worker_main(argv)
    finally:
        if server is not None:  # last: a scrape during shutdown still gets an answer
            server.stop()
