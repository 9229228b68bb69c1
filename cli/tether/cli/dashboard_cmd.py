"""`tether dashboard`: serve the web dashboard (needs the `dashboard` extra: Starlette, uvicorn, Jinja2)."""

from __future__ import annotations

import asyncio
import os
import secrets

import click

from tether.common import errors
from tether.common import tls as tls_mod


@click.command()
@click.option("--controller", envvar="TETHER_CONTROLLER", default=None, help="host:port of the controller.")
@click.option("--admin-token", envvar="TETHER_ADMIN_TOKEN", default=None, help="The admin API's token.")
@click.option("--admin-token-file", default=None, help="Read the admin token from this file (a mounted Secret).")
@click.option(
    "--token-file",
    default=None,
    help="The dashboard's access token (login form, bearer) from this file; else $TETHER_DASHBOARD_TOKEN; "
    "else one is made and printed.",
)
@click.option("--session-key-file", default=None, help="Sign session cookies with this file's key (replicas share it).")
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="kubeconfig file (default: in-cluster).")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to show (repeatable; '*' = all; default: the context's).",
)
@click.option(
    "--auth",
    type=click.Choice(["token", "kubernetes"]),
    default="token",
    show_default=True,
    help="token: log in with the dashboard token; kubernetes: with one's own Kubernetes bearer token (the API "
    "server checks it and its RBAC applies: listing the MLTasks shown to log in, patching them for controls).",
)
@click.option("--allow-controls", is_flag=True, help="Offer pause/resume/promote/abort on the task pages.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--interval", default=2.0, show_default=True, help="Seconds between upstream polls per subject.")
@click.option("--secure-cookies", is_flag=True, help="Mark the session cookie Secure (served behind TLS).")
@tls_mod.client_options
def dashboard(
    controller: str | None,
    admin_token: str | None,
    admin_token_file: str | None,
    token_file: str | None,
    session_key_file: str | None,
    kubeconfig: str | None,
    namespaces: tuple[str, ...],
    auth: str,
    allow_controls: bool,
    host: str,
    port: int,
    interval: float,
    secure_cookies: bool,
    tls: tls_mod.ClientTLS,
) -> None:
    """Serve the dashboard: MLTasks, stages and gates, coverage plots, events, federated rounds, the fleet."""
    from tether.common import config
    from tether.dashboard import settings as settings_mod
    from tether.dashboard import webserver

    try:
        if admin_token_file:
            admin_token = settings_mod.read_secret(admin_token_file, what="admin token")
        token = (
            settings_mod.read_secret(token_file, what="dashboard token")
            if token_file
            else os.environ.get("TETHER_DASHBOARD_TOKEN", "")
        )
        made = not token
        token = token or secrets.token_urlsafe(24)
        settings = settings_mod.Settings(
            controller=controller or config.controller_target(),
            admin_token=admin_token or "",
            token=token,
            auth=auth,
            tls=tls,
            kubeconfig=kubeconfig,
            namespaces=namespaces,
            allow_controls=allow_controls,
            interval_s=interval,
            host=host,
            port=port,
            secure_cookies=secure_cookies,
            session_key=settings_mod.read_secret(session_key_file, what="session key").encode()
            if session_key_file
            else None,
        )
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    how = "your Kubernetes bearer token" if auth == "kubernetes" else "the dashboard token"
    click.echo(f"dashboard: {webserver.url(settings)} (log in with {how})")
    if made and auth == "token":
        click.echo(f"dashboard token (made for this run): {token}")
    asyncio.run(webserver.server(settings, log_level="info").serve())
