"""`tether operator`: run the Kubernetes operator (Kopf) until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import pathlib

import click

from tether.common import config, exposition
from tether.common.tls import ClientTLS, client_options


@click.command("operator")
@click.option(
    "--controller",
    envvar=config.ENV_CONTROLLER,
    default=config.DEFAULT_CONTROLLER,
    show_default=True,
    help=f"host:port of the controller's gRPC port (env {config.ENV_CONTROLLER}).",
)
@click.option(
    "--admin-token",
    envvar=config.ENV_ADMIN_TOKEN,
    required=True,
    help=f"Bearer token for the controller's admin API (env {config.ENV_ADMIN_TOKEN}).",
)
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    envvar="TETHER_NAMESPACES",
    help="Namespace to watch; repeat for several (env TETHER_NAMESPACES, space-separated). "
    "Without it, MLTasks of all namespaces are watched (needs cluster-wide RBAC).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    envvar="TETHER_KUBECONFIG",
    default=None,
    help="Kubeconfig file of the cluster (e.g. the emulator's). "
    "Default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Seconds between status polls of each task's release.",
)
@click.option(
    "--liveness-endpoint",
    default=None,
    help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option(
    "--peering",
    envvar="TETHER_PEERING",
    default=None,
    help="Run as one of several replicas, one active, through this Kopf peering object (env TETHER_PEERING): "
    "a ClusterKopfPeering when watching all namespaces, else a KopfPeering in each watched namespace. "
    "It must exist (the chart creates it). Without it the operator runs standalone: run exactly one.",
)
@click.option(
    "--priority",
    type=click.IntRange(min=1),
    envvar="TETHER_PEERING_PRIORITY",
    default=None,
    help="With --peering: this replica's priority; the highest works, the others wait. "
    "Default: a random one (Kopf pauses replicas of equal priority).",
)
@exposition.metrics_port_option("tether_operator_*")
@client_options
def operator(
    controller: str,
    admin_token: str,
    namespaces: tuple[str, ...],
    kubeconfig: pathlib.Path | None,
    poll_interval: float,
    liveness_endpoint: str | None,
    peering: str | None,
    priority: int | None,
    tls: ClientTLS,
    metrics_port: int,
) -> None:
    """Run the Kubernetes operator: MLTask objects in, releases on the controller out."""
    from tether.common import tracing
    from tether.operator import handlers, release_client

    if priority is not None and peering is None:
        raise click.BadParameter("--priority needs --peering", param_hint="--priority")

    # OTEL_* (off unless an exporter or endpoint is named), with OTel's gRPC client spans.
    tracing.configure("tether-operator", instrument_=("grpc-client",))

    async def main() -> None:
        async with release_client.connect(controller, admin_token, tls=tls) as release_admin:
            await handlers.run(
                admin=release_admin,
                namespaces=list(namespaces),
                poll_interval=poll_interval,
                kubeconfig=kubeconfig,
                liveness_endpoint=liveness_endpoint,
                metrics_port=metrics_port or None,
                peering=peering,
                priority=priority,
            )

    asyncio.run(main())
