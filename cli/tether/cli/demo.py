"""`tether demo`: the whole system on one machine, with a simulated fleet.

Starts every component as its own process (see `tether.devtools.stack`), builds and
uploads the example bundle, applies the example MLTask to the Kubernetes API,
shows the rollout live, prints the aggregate, and stops everything it started,
also on Ctrl-C. `--blobs http` adds an nginx origin the devices fetch bundle files
from by signed URL, and says how many bytes came from it and from the controller.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.resources
import json
import pathlib
import time
from typing import Any

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tether.devtools import stack as stack_mod

EXAMPLE = "digits"


def example_dir(name: str = EXAMPLE) -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("tether.examples") / name))


def load_mltask(path: pathlib.Path, *, digest: str, namespace: str) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["bundle"]["digest"] = digest
    return doc


@click.command()
@click.option(
    "--scenario",
    type=click.Choice(["rollout", "fl"]),
    default="rollout",
    show_default=True,
    help="rollout: the example MLTask rolled out, run and aggregated; fl: examples/digits-fl learned in federated "
    "rounds by the fleet, live (see --rounds, --per-round).",
)
@click.option("--agents", default=20, show_default=True, help="Simulated devices to run.")
@click.option("--rounds", type=click.IntRange(1, 100), default=10, show_default=True, help="fl: federated rounds.")
@click.option("--per-round", type=click.IntRange(1, 1000), default=5, show_default=True, help="fl: devices a round.")
@click.option("--timeout", default=110.0, show_default=True, help="Give up after this many seconds.")
@click.option(
    "--kubeconfig",
    envvar="TETHER_KUBECONFIG",
    default=None,
    help="Use this cluster instead of the in-process Kubernetes API emulator.",
)
@click.option(
    "--database-url", envvar="TETHER_DATABASE_URL", default=None, help="Use this PostgreSQL instead of an embedded one."
)
@click.option(
    "--broker-url",
    envvar="TETHER_BROKER_URL",
    default=None,
    help="Use this Celery broker instead of an embedded redis-server.",
)
@click.option("--keep", is_flag=True, help="Keep the working directory (logs, state) afterwards.")
@click.option("--no-tls", is_flag=True, help="Plaintext gRPC instead of TLS with a local CA.")
@click.option("--unsigned", is_flag=True, help="Do not sign the bundle (and let the devices run unsigned bundles).")
@click.option(
    "--blobs",
    type=click.Choice(stack_mod.BLOB_MODES),
    default="grpc",
    show_default=True,
    help="Where devices pull bundle files: grpc (streamed by the controller) or http (an nginx origin started "
    "for the demo, serving the controller's blob directory to per-device signed URLs).",
)
@click.option(
    "--dashboard",
    "with_dashboard",
    is_flag=True,
    help="Also serve the web dashboard (needs the `dashboard` extra): print its URL and token, watch the rollout "
    "there, and keep everything up after the demo until Ctrl-C.",
)
@click.option("--dashboard-port", default=0, show_default=True, help="Port of the dashboard (0: a free one).")
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    default=None,
    help="Also write the outcome as JSON here.",
)
def demo(
    scenario: str,
    agents: int,
    rounds: int,
    per_round: int,
    timeout: float,
    kubeconfig: str | None,
    database_url: str | None,
    broker_url: str | None,
    keep: bool,
    no_tls: bool,
    unsigned: bool,
    blobs: str,
    with_dashboard: bool,
    dashboard_port: int,
    json_out: pathlib.Path | None,
) -> None:
    """Run the whole system locally with a simulated fleet and print the aggregate.

    By default the controller serves TLS (a CA made for this run) and the
    bundle is signed with a key made for this run, which the devices trust.
    """
    console = Console()
    config = stack_mod.StackConfig(
        agents=agents,
        database_url=database_url,
        broker_url=broker_url,
        kubeconfig=kubeconfig,
        keep_workdir=keep,
        tls=not no_tls,
        sign=not unsigned,
        blobs=blobs,
    )
    if scenario == "fl" and per_round > agents:
        raise click.BadParameter(f"{per_round} devices a round out of {agents}", param_hint="--per-round")
    try:
        if scenario == "fl":
            from tether.cli import demo_fl

            plan = demo_fl.Plan(agents=agents, per_round=per_round, rounds=rounds)
            outcome = asyncio.run(demo_fl.run_fl_demo(config, plan=plan, console=console, timeout=timeout))
        else:
            outcome = asyncio.run(
                run_demo(
                    config,
                    console=console,
                    timeout=timeout,
                    dashboard=with_dashboard,
                    dashboard_port=dashboard_port,
                    on_outcome=(lambda o: json_out.write_text(json.dumps(o, indent=2, sort_keys=True)))
                    if json_out is not None
                    else None,
                )
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything the demo started has been stopped[/]")
        raise SystemExit(130) from None
    if json_out is not None:
        json_out.write_text(json.dumps(outcome, indent=2, sort_keys=True))
    if not outcome["ok"]:
        raise SystemExit(1)


async def run_demo(
    config: stack_mod.StackConfig,
    *,
    console: Console,
    timeout: float,
    dashboard: bool = False,
    dashboard_port: int = 0,
    on_outcome: Any = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    stack = stack_mod.LocalStack(config)
    console.rule("[bold]Tether demo")
    try:
        outcome = await _scenario(
            stack, console=console, timeout=timeout, t0=t0, dashboard_port=dashboard_port if dashboard else None
        )
        if dashboard:
            if on_outcome is not None:
                on_outcome(outcome)
            console.print(f"[bold]dashboard still up at {stack.dashboard_url}[/] (Ctrl-C stops it and everything else)")
            await asyncio.Event().wait()
        return outcome
    finally:
        with console.status("stopping everything the demo started"):
            await stack.stop()
        if config.keep_workdir:
            console.print(f"logs and state kept in {stack.workdir}")


async def _step(console: Console, label: str, coro: Any) -> Any:
    t = time.monotonic()
    with console.status(label):
        result = await coro
    console.print(f"[green]✓[/] {label} [dim]({time.monotonic() - t:.1f}s)[/]")
    return result


async def _scenario(
    stack: stack_mod.LocalStack, *, console: Console, timeout: float, t0: float, dashboard_port: int | None = None
) -> dict[str, Any]:
    from tether.common.bundle_files import build_manifest

    cfg = stack.config
    await _step(console, "PostgreSQL and the Celery broker", stack.start_services())
    if cfg.blobs == "http":
        origin = await _step(console, "nginx blob origin", asyncio.to_thread(stack.start_origin))
        console.print(f"  serving the controller's blob directory at {origin.base_url} to signed URLs only")
    await _step(console, "controller and Celery worker", asyncio.gather(stack.start_controller(), stack.start_worker()))
    await _step(
        console,
        "Kubernetes API " + ("(kubeconfig)" if cfg.kubeconfig else "(in-process emulator)"),
        stack.start_cluster(),
    )
    await _step(console, "operator", stack.start_operator())
    if dashboard_port is not None:
        try:
            url, token = await _step(console, "dashboard", stack.start_dashboard(port=dashboard_port))
        except ImportError as e:
            raise click.ClickException(
                f"--dashboard needs the dashboard extra (pip install 'tether[dashboard]'): {e}"
            ) from None
        stack.dashboard_url = url
        console.print(f"  [bold]dashboard: {url}[/]  log in with the token {token}")
    ex = example_dir()
    await _step(console, f"{cfg.agents} simulated devices", stack.start_fleet(ex / "device_data.npz"))

    bundle_dir = ex / "task"
    manifest = build_manifest(bundle_dir)
    signature = stack.sign(manifest)
    signed = {} if signature is None else {"signature": signature.signature, "key_id": signature.key_id}
    async with stack.admin_client() as admin:
        upload = await _step(
            console,
            f"bundle {manifest.name} built{', signed' if signature else ''} and uploaded",
            admin.upload_bundle(bundle_dir, manifest, **signed),
        )
        console.print(
            f"  manifest {manifest.digest[:19]}…  {len(manifest.files)} files, "
            f"{upload.uploaded_blobs} blobs / {upload.uploaded_bytes} bytes uploaded"
        )
        console.print(
            "  "
            + ("TLS (local CA)" if stack.ca_file else "plaintext gRPC")
            + ", "
            + (f"signed by key {signature.key_id} (the devices trust only it)" if signature else "unsigned")
        )
        task = load_mltask(ex / "mltask.yaml", digest=manifest.digest, namespace=cfg.namespace)
        name = task["metadata"]["name"]
        release = f"{cfg.namespace}/{name}"
        await _step(console, f"MLTask {release} applied", stack.cluster.create(task))
        status, cr_status = await _watch(stack, admin, release, console=console, timeout=timeout, fleet=cfg.agents)

        delivery = await stack.blob_delivery()
        if cfg.blobs == "http":
            console.print(
                f"  devices pulled from the origin {delivery['origin']}: {delivery['origin_requests']} requests, "
                f"{delivery['origin_bytes']} bytes, {delivery['origin_devices']} devices; "
                f"{delivery['controller_blob_bytes']} blob bytes through the controller (gRPC fallback)"
            )

    elapsed = time.monotonic() - t0
    aggregate = json.loads(status.aggregate_json) if status.aggregate_json else {}
    ok = (
        cr_status.get("phase") == "Succeeded"
        and status.succeeded == status.targeted > 0
        and aggregate.get("results") == status.succeeded
    )
    _print_outcome(console, release, status, cr_status, aggregate, elapsed, ok)
    return {
        "ok": ok,
        "release": release,
        "elapsed_s": round(elapsed, 2),
        "devices": cfg.agents,
        "targeted": status.targeted,
        "installed": status.installed,
        "succeeded": status.succeeded,
        "failed": status.failed,
        "phase": cr_status.get("phase"),
        "aggregate": aggregate,
        "tls": stack.ca_file is not None,
        "signed_by": signature.key_id if signature else None,
        "blobs": delivery,
    }


# What each progress row counts, over the devices the MLTask's target selects.
PROGRESS_ROWS = (
    ("notified", "devices notified"),
    ("installed", "devices installed"),
    ("succeeded", "devices ran the task"),
    ("aggregated", "results aggregated"),
)


class _Count(ProgressColumn):
    """`done/total`, or `waiting` while the number of targeted devices is not known yet (never `0/?`)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("waiting", style="progress.download")
        return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")


async def _watch(
    stack: stack_mod.LocalStack, admin: Any, release: str, *, console: Console, timeout: float, fleet: int
) -> tuple[Any, dict[str, Any]]:
    namespace, name = release.split("/", 1)
    deadline = time.monotonic() + timeout
    columns = (TextColumn("{task.description:<22}"), BarColumn(), _Count(), TimeElapsedColumn())
    status: Any = None
    cr_status: dict[str, Any] = {}
    phase_shown: str | None = None
    targeted_shown = False
    with Progress(*columns, console=console, transient=False) as progress:
        bars = {key: progress.add_task(label, total=None) for key, label in PROGRESS_ROWS}
        while True:
            try:
                status = await admin.get_release_status(release)
            except Exception:  # not yet created by the operator
                status = None
            obj = await stack.cluster.get(namespace, name)
            cr_status = (obj or {}).get("status") or {}
            if status is not None and status.targeted and not targeted_shown:
                progress.console.print(
                    f"  its target selects {status.targeted} of the {fleet} devices; the rows below count those"
                )
                targeted_shown = True
            phase = cr_status.get("phase")
            if phase and phase != phase_shown:  # each phase the operator writes, once, above the bars
                progress.console.print(f"  MLTask phase: {phase}")
                phase_shown = phase
            if status is not None and status.targeted:
                total = status.targeted
                aggregate = json.loads(status.aggregate_json) if status.aggregate_json else {}
                for key, done in (
                    ("notified", status.notified),
                    ("installed", status.installed),
                    ("succeeded", status.succeeded),
                    ("aggregated", aggregate.get("results", 0)),
                ):
                    progress.update(bars[key], total=total, completed=done)
                done = (
                    status.targeted > 0
                    and status.succeeded + status.failed + status.refused >= status.targeted
                    and aggregate.get("results", 0) >= status.succeeded
                    and cr_status.get("phase") in ("Succeeded", "Failed")
                )
                if done:
                    return status, cr_status
            if cr_status.get("phase") == "Invalid":
                raise click.ClickException(f"the example MLTask was rejected: {cr_status}")
            if time.monotonic() > deadline:
                console.print(f"[red]timed out after {timeout:.0f}s[/]")
                if status is None:
                    raise click.ClickException("the release never reached the controller")
                return status, cr_status
            await asyncio.sleep(0.25)


def _print_outcome(
    console: Console, release: str, status: Any, cr: dict[str, Any], aggregate: dict[str, Any], elapsed: float, ok: bool
) -> None:
    row = Table(title="kubectl get mltasks", title_justify="left")
    for col in ("NAME", "PHASE", "STAGE", "TARGETED", "INSTALLED", "SUCCEEDED", "FAILED"):
        row.add_column(col)
    row.add_row(
        release.split("/", 1)[1],  # kubectl shows the name; the namespace is the context's
        str(cr.get("phase", "?")),
        str(cr.get("stage", "")),
        str(status.targeted),
        str(status.installed),
        str(status.succeeded),
        str(status.failed),
    )
    console.print(row)

    agg = Table(title=f"aggregate (round {status.aggregate_round})", title_justify="left")
    agg.add_column("quantity")
    agg.add_column("value", justify="right")
    agg.add_row("devices reporting", str(aggregate.get("devices", 0)))
    agg.add_row("samples", str(aggregate.get("samples", 0)))
    for key, value in sorted((aggregate.get("metrics") or {}).items()):
        agg.add_row(f"{key} (sample-weighted)", f"{value:.4f}")
    for key, value in sorted((aggregate.get("counts") or {}).items()):
        agg.add_row(f"{key} (sum)", str(value))
    mean_probs = ((aggregate.get("tensors") or {}).get("mean_probs") or {}).get("values")
    if mean_probs:
        agg.add_row("mean predicted class distribution", " ".join(f"{p:.2f}" for p in mean_probs))
    console.print(agg)
    verdict = "[green]demo finished[/]" if ok else "[red]demo did not complete[/]"
    console.print(f"{verdict} in {elapsed:.1f}s")
