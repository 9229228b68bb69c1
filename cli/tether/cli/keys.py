"""`tether keys`: Ed25519 key pairs that sign bundles (`tether bundle build --sign`)."""

from __future__ import annotations

import pathlib

import click

from tether.common import errors, signing


@click.group()
def keys() -> None:
    """Make and inspect Ed25519 bundle signing keys."""


@keys.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def generate(path: pathlib.Path, force: bool) -> None:
    """Write a private key to PATH (mode 0600) and its public key to PATH with a .pub suffix.

    Sign with the private key (`tether bundle build --sign PATH`); give the
    public key to agents (`tether agent run --trust-key PATH.pub`). Prints the key id.
    """
    try:
        private, public, key_id = signing.generate(path, overwrite=force)
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"private key: {private}", err=True)
    click.echo(f"public key:  {public}", err=True)
    click.echo(key_id)


@keys.command("id")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
def key_id(path: pathlib.Path) -> None:
    """Print the key id of a public (or private) key file: what manifests name as key_id."""
    try:
        click.echo(signing.key_id(signing.load_public_key(path)))
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
