"""`tether status TASK`: a task's rollout progress and its latest aggregate, from the controller."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from tether.common import errors


def render(status: Any) -> Group:
    """Bars for the delivery counts and a table of the aggregate."""
    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), expand=False)
    total = max(status.targeted, 1)
    for label, done in (
        ("notified", status.notified),
        ("installed", status.installed),
        ("succeeded", status.succeeded),
        ("failed", status.failed),
        ("results", status.results),
    ):
        progress.add_task(label, total=total, completed=done)
    head = Table.grid(padding=(0, 2))
    head.add_row("task", f"[bold]{status.release}[/]", "version", str(status.version))
    head.add_row("manifest", status.manifest_digest[:23] + "…", "targeted", str(status.targeted))
    parts: list[Any] = [head, progress]
    agg = status.aggregate or {}
    if agg:
        table = Table(title=f"aggregate, round {status.aggregate_round}", title_justify="left")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row(
            "devices / results / samples", f"{agg.get('devices')} / {agg.get('results')} / {agg.get('samples')}"
        )
        for k, v in sorted((agg.get("metrics") or {}).items()):
            table.add_row(k, f"{v:.4f}")
        for k, v in sorted((agg.get("counts") or {}).items()):
            table.add_row(k, str(v))
        for k, t in sorted((agg.get("tensors") or {}).items()):
            values = t.get("values") or []
            shown = " ".join(f"{x:.3g}" for x in values[:10]) + (" …" if len(values) > 10 else "")
            table.add_row(f"{k} {t.get('shape')}", shown)
        parts.append(table)
    return Group(*parts)


@click.command()
@click.argument("task")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of TASK (a bare name).")
@click.option("--controller", envvar="TETHER_CONTROLLER", default=None, help="host:port of the controller.")
@click.option("--admin-token", envvar="TETHER_ADMIN_TOKEN", required=True)
@click.option("--watch", "-w", is_flag=True, help="Keep refreshing until interrupted.")
@click.option("--interval", default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(
    task: str, namespace: str, controller: str | None, admin_token: str, watch: bool, interval: float, as_json: bool
) -> None:
    """Show TASK's rollout (namespace/name, or a name with -n) and its latest aggregate."""
    release = task if "/" in task else f"{namespace}/{task}"
    try:
        asyncio.run(_show(release, controller, admin_token, watch=watch, interval=interval, as_json=as_json))
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


async def _show(
    release: str, controller: str | None, token: str, *, watch: bool, interval: float, as_json: bool
) -> None:
    from tether.common.admin import AdminClient

    console = Console()
    async with AdminClient(controller, token=token) as admin:
        current = await admin.get_release_status(release)
        if as_json:
            doc = {k: v for k, v in vars(current).items() if k != "aggregate_json"}
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=dict))
            return
        if not watch:
            console.print(render(current))
            return
        with Live(render(current), console=console, refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await admin.get_release_status(release)))
