"""`tether device`: manage enrolled devices through the controller's admin API."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

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


@device.command("list")
@click.option(
    "--controller",
    envvar=config.ENV_CONTROLLER,
    default=None,
    help=f"host:port of the controller (env {config.ENV_CONTROLLER}).",
)
@click.option(
    "--admin-token", envvar=config.ENV_ADMIN_TOKEN, required=True, help=f"Admin token (env {config.ENV_ADMIN_TOKEN})."
)
@click.option("--all", "include_revoked", is_flag=True, help="Revoked devices too.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many devices.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@tls_mod.client_options
def list_(
    controller: str | None,
    admin_token: str,
    include_revoked: bool,
    limit: int | None,
    output: str,
    tls: tls_mod.ClientTLS,
) -> None:
    """The inventory: labels, backends and what selection chose, releases delivered, connected replica, last seen."""
    import dataclasses
    import datetime
    import json

    from rich.console import Console
    from rich.table import Table

    from tether.common.admin_client import AdminClient, DeviceSummary

    async def fetch() -> list[DeviceSummary]:
        async with AdminClient(controller, token=admin_token, tls=tls) as admin:
            return await admin.list_devices(include_revoked=include_revoked, limit=limit)

    try:
        found = asyncio.run(fetch())
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    if output == "json":
        click.echo(json.dumps([dataclasses.asdict(d) for d in found], indent=2, sort_keys=True))
        return
    table = Table(
        "DEVICE",
        "LABELS",
        "RELEASES (version state)",
        "BACKENDS",
        "SELECTED",
        "CONNECTED TO",
        "CONDITIONS",
        "LAST SEEN",
    )
    for d in found:
        seen = (
            datetime.datetime.fromtimestamp(d.last_seen_unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if d.last_seen_unix
            else "never"
        )
        table.add_row(
            d.device_id + (" (revoked)" if d.revoked else ""),
            ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())),
            "\n".join(f"{r} v{v} {st}" for r, v, st in d.releases) or "-",
            ",".join(d.backends) or "-",
            "\n".join(d.selected_backends) or "-",
            d.connected_replica or "-",
            _conditions(d.device_state),
            seen,
        )
    Console(width=200).print(table)
    click.echo(f"{len(found)} device(s)")


def _conditions(state: Mapping[str, str]) -> str:
    """charging / unmetered / idle as the device reported them, then what waits and why."""
    short = {"charging": "charging", "unmeteredNetwork": "unmetered", "idle": "idle"}
    lines = [" ".join(f"{name}={state[k]}" for k, name in short.items() if k in state)]
    if state.get("batteryLevel"):
        lines[0] += f" battery={state['batteryLevel']}%"
    lines += [f"waiting: {w.strip()}" for w in state.get("waiting", "").split(" | ") if w.strip()]
    return "\n".join(x for x in lines if x) or "-"
