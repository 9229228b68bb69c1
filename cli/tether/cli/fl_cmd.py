"""`tether fl`: a federated task's rounds, from the controller's admin API (ReleaseStatus.federated_json)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Mapping
from typing import Any

import click

from tether.common import config, errors
from tether.common import tls as tls_mod

FIXED = ("round", "phase", "participants", "updates", "refused", "samples")


def history_table(doc: Mapping[str, Any] | None) -> tuple[list[str], list[list[str]]]:
    """The per-round table: fixed columns, the server-side metrics (`server_<name>`, sorted), one column per device
    metric (sorted; sample-weighted over the round's updates), epsilon, and why server evaluation failed."""
    history = list((doc or {}).get("history") or [])
    server = sorted({str(m) for h in history for m in (h.get("evaluation") or {})})
    metrics = sorted({str(m) for h in history for m in (h.get("metrics") or {})})
    failed = any(h.get("evaluationError") for h in history)
    header = [*FIXED, *(f"server_{m}" for m in server), *metrics, "epsilon", *(["evaluation_error"] if failed else [])]
    rows = []
    for h in history:
        scored = h.get("evaluation") or {}
        values = h.get("metrics") or {}
        eps = h.get("epsilon")
        rows.append(
            [str(h.get(c, "")) for c in FIXED]
            + [f"{float(scored[m]):.6g}" if m in scored else "" for m in server]
            + [f"{float(values[m]):.6g}" if m in values else "" for m in metrics]
            + ["" if eps is None else f"{float(eps):.6g}"]
            + ([str(h.get("evaluationError") or "")] if failed else [])
        )
    return header, rows


def render(header: list[str], rows: list[list[str]], *, as_csv: bool) -> str:
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


@click.group()
def fl() -> None:
    """Federated rounds of a task."""


@fl.command()
@click.argument("release")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated values instead of a table.")
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
def history(release: str, as_csv: bool, controller: str | None, admin_token: str, tls: tls_mod.ClientTLS) -> None:
    """Print RELEASE's rounds (NAMESPACE/TASK): participants, updates, refusals, samples, metrics, epsilon."""
    from tether.common.admin_client import AdminClient

    async def fetch() -> Mapping[str, Any] | None:
        async with AdminClient(controller, token=admin_token, tls=tls) as admin:
            return (await admin.get_release_status(release)).federated

    try:
        doc = asyncio.run(fetch())
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    if not doc:
        raise click.ClickException(f"{release} is not federated or has run no round yet")
    header, rows = history_table(doc)
    click.echo(render(header, rows, as_csv=as_csv), nl=False)


def _controller_options(f: Any) -> Any:
    f = tls_mod.client_options(f)
    f = click.option(
        "--admin-token",
        envvar=config.ENV_ADMIN_TOKEN,
        required=True,
        help=f"Admin token (env {config.ENV_ADMIN_TOKEN}).",
    )(f)
    return click.option(
        "--controller",
        envvar=config.ENV_CONTROLLER,
        default=None,
        help=f"host:port of the controller (env {config.ENV_CONTROLLER}).",
    )(f)


@fl.command()
@click.argument("release")
@click.option("--round", "round_number", type=click.IntRange(min=0), required=True, help="The round (0: the base).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to write the model.")
@_controller_options
def export(
    release: str, round_number: int, output: str, controller: str | None, admin_token: str, tls: tls_mod.ClientTLS
) -> None:
    """Write RELEASE's global model after a round (a safetensors file)."""
    from tether.common.admin_client import AdminClient

    async def fetch() -> str:
        async with AdminClient(controller, token=admin_token, tls=tls) as admin:
            return await admin.export_round_model(release, round_number, output)

    try:
        digest = asyncio.run(fetch())
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"round {round_number} of {release}: {digest} -> {output}")


@fl.command()
@click.argument("release")
@click.option("--round", "round_number", type=click.IntRange(min=0), required=True, help="The round (0: the base).")
@_controller_options
def rollback(release: str, round_number: int, controller: str | None, admin_token: str, tls: tls_mod.ClientTLS) -> None:
    """Serve RELEASE's model after a round again; the next round trains from it (a live round is cancelled)."""
    from tether.common.admin_client import AdminClient

    async def call() -> Any:
        async with AdminClient(controller, token=admin_token, tls=tls) as admin:
            return await admin.rollback_round(release, round_number)

    try:
        done = asyncio.run(call())
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    cancelled = f"; round {done.cancelled_round} cancelled" if done.cancelled_round else ""
    click.echo(f"{release} v{done.version} serves round {round_number}'s model {done.model}{cancelled}")
