"""`tether device`: manage enrolled devices through the controller's admin API."""

from __future__ import annotations

import asyncio

import click

from tether.common import config, errors
from tether.common import tls as tls_mod


@click.group()
def device() -> None:
    """Manage enrolled devices."""


@device.command()
@click.argument("device_id")
@click.option(
    "--controller",
    envvar=config.ENV_CONTROLLER,
    default=None,
    help=f"host:port of the controller (env {config.ENV_CONTROLLER}).",
)
@click.option(
    "--admin-token", envvar=config.ENV_ADMIN_TOKEN, required=True, help=f"Admin token (env {config.ENV_ADMIN_TOKEN})."
)
@tls_mod.client_options
def revoke(device_id: str, controller: str | None, admin_token: str, tls: tls_mod.ClientTLS) -> None:
    """Revoke DEVICE_ID: its credential stops working, its stream is ended, it cannot enrol again."""
    from tether.common.admin_client import AdminClient

    async def main() -> None:
        async with AdminClient(controller, token=admin_token, tls=tls) as admin:
            result = await admin.revoke_device(device_id)
        if result.revoked:
            stream = "its stream was ended" if result.disconnected else "it had no open stream here"
            click.echo(f"device {device_id} revoked; {stream}")
        else:
            click.echo(f"device {device_id} was already revoked")

    try:
        asyncio.run(main())
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
