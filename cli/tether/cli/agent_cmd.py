"""`tether agent`: run the edge agent, a simulated fleet, or inspect this device's backends.

Imports only the agent's own dependencies (no Kopf, Celery or psycopg), so a
device with the agent-only install can run it. Both long-running commands stop
cleanly on SIGTERM or SIGINT: running task workers are killed, the stream is
closed and state is saved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from tether.common import config, signing
from tether.common import tls as tls_mod

DEFAULT_STATE_DIR = "~/.tether/agent"


def _parse_attrs(values: tuple[str, ...]) -> dict[str, str]:
    attrs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} must be KEY=VALUE", param_hint="--attr")
        attrs[key.strip()] = val.strip()
    return attrs


def _run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def _controller_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--controller",
        envvar=config.ENV_CONTROLLER,
        default=config.DEFAULT_CONTROLLER,
        show_default=True,
        help=f"Controller gRPC address HOST:PORT (env {config.ENV_CONTROLLER}).",
    )(f)


def _token_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--bootstrap-token",
        "--enroll-token",
        "bootstrap_token",
        envvar=config.ENV_BOOTSTRAP_TOKEN,
        default="",
        help=f"Enrolment token, used once to obtain this device's credential (env {config.ENV_BOOTSTRAP_TOKEN}).",
    )(f)


def _limits_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The device's caps on one task run; a release's `resources` apply within them (the default when it sets none)."""
    f = click.option(
        "--task-timeout",
        type=click.FloatRange(min=0, min_open=True, max=24 * 3600),
        default=60.0,
        show_default=True,
        help="Cap on the seconds a task run may take (a release's timeoutSeconds applies below it).",
    )(f)
    f = click.option(
        "--task-memory-mb",
        type=click.IntRange(min=16),
        default=512,
        show_default=True,
        help="Cap on the address space of a run, MiB (a release's memoryMB applies below it).",
    )(f)
    return click.option(
        "--task-cpu-seconds",
        type=click.IntRange(min=1),
        default=None,
        help="Cap on the CPU time of a run, seconds (a release's cpuSeconds applies below it); default: no cap.",
    )(f)


def _security_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """TLS to the controller (`tls`: a ClientTLS) and the bundle signing keys this device trusts (`trust_keys`)."""
    f = click.option(
        "--trust-key",
        "trust_keys",
        multiple=True,
        envvar=signing.ENV_TRUSTED_KEYS,
        type=click.Path(dir_okay=False),
        help="Ed25519 public key (PEM) whose signed bundles this device runs; repeatable "
        f"(env {signing.ENV_TRUSTED_KEYS}, paths separated by '{os.pathsep}'). With any, unsigned or "
        "otherwise signed bundles are refused and reported; without, signatures are not checked.",
    )(f)
    return tls_mod.client_options(server_name=False)(f)


def _trusted_keys(paths: tuple[str, ...]) -> dict[str, bytes] | None:
    """The keys of --trust-key; None (no signature check, with a warning) when none is given."""
    from tether.common import errors

    if not paths:
        logging.getLogger("tether.agent").warning(
            "no --trust-key given: this agent runs bundles without checking their signature"
        )
        return None
    try:
        return signing.load_trusted_keys(paths)
    except errors.TetherError as e:
        raise click.BadParameter(str(e), param_hint="--trust-key") from None


def _disk_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--disk-budget as bytes (None: unlimited); a clear usage error when it is not a size."""
    from tether.agent import sizes
    from tether.common import errors

    if value is None:
        return sizes.DEFAULT_DISK_BUDGET
    try:
        return sizes.parse_size(value, what="")
    except errors.InvalidArgument as e:
        raise click.BadParameter(str(e)) from None


def _disk_budget_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--disk-budget",
        envvar="TETHER_AGENT_DISK_BUDGET",
        default="1GiB",
        show_default=True,
        callback=_disk_budget,
        metavar="SIZE",
        help="Most disk the bundle store may use: blobs, partial downloads and installed versions (not the "
        "state file, results waiting for upload or the event store, which have their own bounds). Before a "
        "pull the agent frees unreferenced blobs, then old versions, then rollback copies; a version that "
        "still does not fit is not downloaded and is reported FAILED. 500MB, 2GiB (MB = 1000^2, MiB = "
        "1024^2), bytes, or 'unlimited'. Bounded by default because a device's disk is shared with its "
        "owner's data (env TETHER_AGENT_DISK_BUDGET).",
    )(f)


def _workers_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Concurrency and warm task workers (docs/task-api.md, "Isolation and limits")."""
    f = click.option(
        "--task-slots",
        type=click.IntRange(min=1, max=1024),
        default=4,
        show_default=True,
        help="Most task runs at once on this device; waiting runs are served round-robin across tasks.",
    )(f)
    f = click.option(
        "--warm-workers",
        type=click.IntRange(min=0, max=1024),
        default=8,
        show_default=True,
        help="Most resident task workers (one per active task version; 0: every run forks a worker of its own).",
    )(f)
    f = click.option(
        "--warm-memory-budget",
        default="1GiB",
        show_default=True,
        callback=_disk_budget,
        metavar="SIZE",
        help="Most resident memory (RSS) idle warm workers may hold; the least recently used retire first "
        "('unlimited' turns it off).",
    )(f)
    f = click.option(
        "--worker-idle-seconds",
        type=click.FloatRange(min=1),
        default=300.0,
        show_default=True,
        help="A warm worker that served no run for this long retires.",
    )(f)
    return click.option(
        "--isolation",
        type=click.Choice(["warm", "fresh"]),
        default="warm",
        show_default=True,
        help="warm: runs go to resident workers forked from a pre-started zygote; fresh: a new interpreter "
        "per run for every task (a bundle's runtime.isolation: fresh asks for that on its own).",
    )(f)


def _events_socket(value: str | None, state_path: pathlib.Path) -> pathlib.Path | None:
    if value == "none":
        return None
    return pathlib.Path(os.path.expanduser(value)) if value else state_path / "events.sock"


@click.group()
def agent() -> None:
    """Run or inspect the edge agent."""


@agent.command()
@_controller_option
@_token_option
@click.option(
    "--state-dir",
    envvar="TETHER_AGENT_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Credential, bundle store and run records.",
)
@click.option("--data-dir", default=None, help="Device-local data tasks read (default: STATE_DIR/data).")
@click.option("--device-id", default=None, help="Device id to enrol with (default: generated once).")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE", help="Device attribute for targeting; repeatable.")
@click.option("--threads", type=int, default=1, show_default=True, help="Engine threads per task run.")
@click.option(
    "--events-socket",
    default=None,
    help="Unix socket apps send behaviour events to (default: STATE_DIR/events.sock; 'none' disables it).",
)
@click.option(
    "--conditions-unknown",
    type=click.Choice(["wait", "run"]),
    envvar="TETHER_AGENT_CONDITIONS_UNKNOWN",
    default="wait",
    show_default=True,
    help="A task's participation condition (charging / unmetered / idle) this device cannot tell: wait or run.",
)
@_disk_budget_option
@_limits_options
@_workers_options
@_security_options
def run(
    controller: str,
    bootstrap_token: str,
    state_dir: str,
    data_dir: str | None,
    device_id: str | None,
    attrs: tuple[str, ...],
    threads: int,
    task_timeout: float,
    task_memory_mb: int,
    task_cpu_seconds: int | None,
    tls: tls_mod.ClientTLS,
    trust_keys: tuple[str, ...],
    events_socket: str | None = None,
    disk_budget: int | None = None,
    task_slots: int = 4,
    warm_workers: int = 8,
    warm_memory_budget: int | None = None,
    worker_idle_seconds: float = 300.0,
    isolation: str = "warm",
    conditions_unknown: str = "wait",
) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    from tether.agent import daemon, httpfetch, runtime, warmpool
    from tether.common import errors, tracing

    tracing.configure("tether-agent")  # OTEL_* (off unless an exporter or endpoint is named; needs the SDK)
    state_path = pathlib.Path(os.path.expanduser(state_dir))
    try:
        the_agent = daemon.Agent(
            # --ca-file is trusted for blob URLs too (a private origin), besides the system's CAs.
            http_settings=httpfetch.HttpSettings(ca_file=str(tls.ca_file) if tls.ca_file else None),
            channel_credentials=tls.channel_credentials(),
            trusted_keys=_trusted_keys(trust_keys),
            controller=controller,
            state_dir=state_path,
            data_dir=pathlib.Path(data_dir) if data_dir else state_path / "data",
            bootstrap_token=bootstrap_token,
            device_id=device_id,
            attributes=_parse_attrs(attrs),
            threads=threads,
            limits=runtime.TaskLimits(timeout_s=task_timeout, memory_mb=task_memory_mb, cpu_seconds=task_cpu_seconds),
            events_socket=_events_socket(events_socket, state_path),
            disk_budget=disk_budget,
            task_slots=task_slots,
            workers=warmpool.PoolSettings(
                max_workers=warm_workers, memory_budget=warm_memory_budget, idle_s=worker_idle_seconds
            ),
            isolation=isolation,
            conditions_unknown=conditions_unknown,
        )
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(the_agent.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        the_agent.stop()
        stopper.cancel()
        try:
            await task
        except errors.TetherError as e:
            raise click.ClickException(str(e)) from None

    _run_until_signalled(main)


@agent.command()
@click.option("--count", type=click.IntRange(1, 100_000), default=10, show_default=True, help="Simulated devices.")
@_controller_option
@_token_option
@click.option("--state-root", required=True, type=click.Path(file_okay=False), help="One sub-directory per device.")
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="An .npz of equal-length arrays; each device gets a shard as data/digits.npz.",
)
@click.option("--concurrency", type=int, default=2, show_default=True, help="Task workers running at once.")
@click.option("--prefix", default="sim", show_default=True, help="Device id prefix.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for attributes and sharding.")
@_limits_options
@_security_options
def fleet(
    count: int,
    controller: str,
    bootstrap_token: str,
    state_root: str,
    data: str | None,
    concurrency: int,
    prefix: str,
    seed: int,
    task_timeout: float,
    task_memory_mb: int,
    task_cpu_seconds: int | None,
    tls: tls_mod.ClientTLS,
    trust_keys: tuple[str, ...],
) -> None:
    """Run COUNT simulated devices in one process until SIGTERM/SIGINT."""
    from tether.agent import runtime
    from tether.common import errors
    from tether.devtools import fleet as fleet_mod

    if not bootstrap_token:
        raise click.UsageError("--bootstrap-token (or TETHER_BOOTSTRAP_TOKEN) is required")
    try:
        channel_credentials = tls.channel_credentials()
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    trusted_keys = _trusted_keys(trust_keys)

    def ready(agents: list[Any]) -> None:
        click.echo(f"fleet ready: {len(agents)} agents connected to {controller}")
        sys.stdout.flush()

    async def main(stop: asyncio.Event) -> None:
        await fleet_mod.run_fleet(
            count=count,
            controller=controller,
            bootstrap_token=bootstrap_token,
            state_root=state_root,
            data=data,
            concurrency=concurrency,
            prefix=prefix,
            seed=seed,
            limits=runtime.TaskLimits(timeout_s=task_timeout, memory_mb=task_memory_mb, cpu_seconds=task_cpu_seconds),
            stop=stop,
            on_ready=ready,
            channel_credentials=channel_credentials,
            trusted_keys=trusted_keys,
        )
        click.echo("fleet stopped")

    _run_until_signalled(main)


@agent.command()
@click.option(
    "--state-dir",
    envvar="TETHER_AGENT_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The agent's state directory (its backend selection cache).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def backends(state_dir: str, as_json: bool) -> None:
    """This device's profile, the engine backends that really run, and the backend chosen per model."""
    from tether.cli import agent_backends_cmd

    doc = agent_backends_cmd.describe(pathlib.Path(os.path.expanduser(state_dir)))
    if as_json:
        click.echo(json.dumps(doc))
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(agent_backends_cmd.table(doc))


@agent.command()
@click.option(
    "--state-dir",
    envvar="TETHER_AGENT_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The agent's state directory (its bundle store).",
)
@_disk_budget_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes in bytes).")
def disk(state_dir: str, disk_budget: int | None, as_json: bool) -> None:
    """How much disk the bundle store uses, against the budget, and per installed version."""
    from tether.agent import bundles, sizes

    root = pathlib.Path(os.path.expanduser(state_dir))
    if not (root / "blobs").is_dir():
        raise click.ClickException(f"{root} holds no bundle store (is --state-dir the agent's?)")
    usage = bundles.BundleStore(root).snapshot()
    if as_json:
        click.echo(json.dumps(usage.to_json(disk_budget)))
        return
    click.echo(f"bundle store {root}: {usage.describe(disk_budget)}")
    for v in usage.to_json(disk_budget)["versions"]:
        click.echo(f"  {v['release']} v{v['version']} ({v['role']}): {sizes.format_size(v['bytes'])}")


@agent.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def conditions(as_json: bool) -> None:
    """What this machine's probes tell of the participation conditions (charging, unmetered network, idle).

    The running agent also takes what the host app reports on its events socket, for a while; a condition
    that is `unknown` here waits unless the agent runs with `--conditions-unknown run`.
    """
    from tether.agent import devicestate

    state = devicestate.probe()
    if as_json:
        click.echo(json.dumps(state, sort_keys=True))
        return
    for key in ("charging", "unmeteredNetwork", "idle", "batteryLevel"):
        if key in state:
            click.echo(f"{key}: {state[key]}")
