"""`tether certs`: a private CA and certificates for the controller's gRPC port (see tether.common.certs)."""

from __future__ import annotations

import pathlib

import click

from tether.common import certs as certs_mod
from tether.common import errors


@click.group()
def certs() -> None:
    """Make a private CA and TLS certificates for the gRPC port."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="DNS name or IP address clients dial the controller by; repeatable "
    f"(default: {', '.join(certs_mod.DEFAULT_HOSTS)}).",
)
@click.option("--force", is_flag=True, help="Replace an existing CA in DIRECTORY.")
def init(directory: pathlib.Path, hosts: tuple[str, ...], force: bool) -> None:
    """Create ca.crt/ca.key and server.crt/server.key (for the hosts) in DIRECTORY."""
    try:
        files = certs_mod.init_ca_dir(directory, hosts=hosts or certs_mod.DEFAULT_HOSTS, overwrite=force)
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"CA:     {files.ca_cert} (key {files.ca_key}: keep it offline)")
    click.echo(f"server: {files.server_cert}, {files.server_key}")
    click.echo(f"controller: tether controller --tls-cert {files.server_cert} --tls-key {files.server_key}")
    click.echo(f"clients:    --ca-file {files.ca_cert}  (or TETHER_CA_FILE)")
    click.echo(
        f"Kubernetes: kubectl create secret generic tether-tls --from-file={directory}/ca.crt "
        f"--from-file=tls.crt={files.server_cert} --from-file=tls.key={files.server_key}"
    )


@certs.command("client")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.argument("name")
def client(directory: pathlib.Path, name: str) -> None:
    """Issue NAME.crt/NAME.key in DIRECTORY: a client certificate for mTLS (--client-cert/--client-key)."""
    try:
        cert, key = certs_mod.issue_client(directory, name)
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"client certificate: {cert}, key: {key}")
    click.echo(f"controller: add --tls-client-ca {directory / 'ca.crt'} to require client certificates")
