"""`tether status TASK`: a task's rollout progress, its federated rounds (with the metric per round as a terminal
plot) and its latest aggregate, from the controller."""

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
from tether.common import tls as tls_mod


def render(status: Any, rollout: Any = None) -> Group:
    """Bars for the delivery counts, the staged rollout (when there is one) and a table of the aggregate."""
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
    silent = int(getattr(status, "not_reporting", 0) or 0)
    if silent:  # told about the version, no report past the deadline (staged or not)
        deadline = getattr(status, "report_deadline_s", 0)
        head.add_row("silent", f"[yellow]{silent}[/]", "deadline", f"{deadline} s")
    parts: list[Any] = [head, progress]
    health = getattr(status, "health", None)
    if health:
        from tether.cli import rollout_view

        parts.append(rollout_view.render(health, rollout))
    from tether.cli import fl_view

    rounds = fl_view.render(getattr(status, "federated", None))
    if rounds is not None:
        parts.append(rounds)
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
@click.option(
    "--kubeconfig", default=None, help="Also read the MLTask (stage names, gate verdicts) with this kubeconfig."
)
@tls_mod.client_options
def status(
    task: str,
    namespace: str,
    controller: str | None,
    admin_token: str,
    watch: bool,
    interval: float,
    as_json: bool,
    tls: tls_mod.ClientTLS,
    kubeconfig: str | None = None,
) -> None:
    """Show TASK's rollout (namespace/name, or a name with -n) and its latest aggregate."""
    release = task if "/" in task else f"{namespace}/{task}"
    try:
        asyncio.run(
            _show(
                release,
                controller,
                admin_token,
                watch=watch,
                interval=interval,
                as_json=as_json,
                tls=tls,
                kubeconfig=kubeconfig,
            )
        )
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


async def _show(
    release: str,
    controller: str | None,
    token: str,
    *,
    watch: bool,
    interval: float,
    as_json: bool,
    tls: tls_mod.ClientTLS | None = None,
    kubeconfig: str | None = None,
) -> None:
    from tether.common.admin_client import AdminClient

    console = Console()
    async with AdminClient(controller, token=token, tls=tls) as admin:
        current = await admin.get_release_status(release)
        rollout = await _rollout_status(release, kubeconfig)
        if as_json:
            doc = {k: v for k, v in vars(current).items() if k != "aggregate_json"}
            if rollout is not None:
                doc["rollout"] = rollout
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=dict))
            return
        if not watch:
            console.print(render(current, rollout))
            return
        with Live(render(current, rollout), console=console, refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(interval)
                rollout = await _rollout_status(release, kubeconfig)
                live.update(render(await admin.get_release_status(release), rollout))


async def _rollout_status(release: str, kubeconfig: str | None) -> Any:
    """`status.rollout` of the MLTask when a kubeconfig was given (the operator's stage and gate verdicts)."""
    if kubeconfig is None:
        return None
    from tether.common import kube

    namespace, name = release.split("/", 1)
    async with kube.KubeClient(await kube.load(kubeconfig)) as client:
        obj = await client.get_mltask(namespace, name)
    return (obj.get("status") or {}).get("rollout")
