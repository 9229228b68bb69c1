"""`tether bundle build DIR`: hash, write a content-addressed bundle, upload what is missing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import shutil

import click
from rich.console import Console

from tether.common import errors, signing
from tether.common import tls as tls_mod


def write_local_bundle(directory: pathlib.Path, manifest, out: pathlib.Path) -> pathlib.Path:
    """Lay the bundle out content-addressed under `out`: blobs/sha256/<hex> and manifests/<hex>.json."""
    blob_root = out / "blobs" / "sha256"
    blob_root.mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        target = blob_root / f.sha256.split(":", 1)[1]
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(directory / f.path, tmp)
            os.replace(tmp, target)
    manifest_path = out / "manifests" / (manifest.digest.split(":", 1)[1] + ".json")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_bytes(manifest.canonical_bytes())
    return manifest_path


@click.group()
def bundle() -> None:
    """Build and upload content-addressed task bundles."""


@bundle.command("build")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default=pathlib.Path(".tether"),
    show_default=True,
    help="Where to write the content-addressed bundle.",
)
@click.option(
    "--controller",
    envvar="TETHER_CONTROLLER",
    default=None,
    help="host:port of the controller to upload to (omit to build locally only).",
)
@click.option("--admin-token", envvar="TETHER_ADMIN_TOKEN", default=None)
@click.option(
    "--sign",
    "sign_key",
    envvar="TETHER_SIGNING_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    default=None,
    help="Ed25519 private key (PEM, from `tether keys generate`) to sign the manifest with "
    "[env TETHER_SIGNING_KEY]. Agents that trust its public key run only bundles it signed.",
)
@tls_mod.client_options
def build(
    directory: pathlib.Path,
    out: pathlib.Path,
    controller: str | None,
    admin_token: str | None,
    sign_key: pathlib.Path | None,
    tls: tls_mod.ClientTLS,
) -> None:
    """Hash every file of DIRECTORY (it holds a bundle.yaml), write the bundle, upload missing blobs."""
    from tether.common.bundle_files import build_manifest

    console = Console()
    try:
        manifest = build_manifest(directory)
        signature = sign_manifest(manifest, sign_key) if sign_key is not None else None
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    path = write_local_bundle(directory, manifest, out)
    console.print(f"bundle [bold]{manifest.name}[/]: {len(manifest.files)} files, {manifest.total_size} bytes")
    console.print(f"manifest written to {path}")
    if signature is not None:
        sig_path = write_signature(path, signature)
        console.print(f"signed with key {signature.key_id} ({sig_path.name})")
    if controller:
        if not admin_token:
            raise click.ClickException("--admin-token (or TETHER_ADMIN_TOKEN) is required to upload")
        result = asyncio.run(_upload(controller, admin_token, directory, manifest, signature=signature, tls=tls))
        console.print(f"uploaded {result.uploaded_blobs} missing blobs ({result.uploaded_bytes} bytes) to {controller}")
    click.echo(manifest.digest)


def sign_manifest(manifest, key_path: pathlib.Path) -> signing.Signature:
    """Sign the manifest's canonical bytes (the preimage of its digest) with an Ed25519 key file."""
    return signing.sign(manifest.canonical_bytes(), signing.load_private_key(key_path))


def write_signature(manifest_path: pathlib.Path, signature: signing.Signature) -> pathlib.Path:
    """`<manifest>.sig`: the detached signature next to the local manifest, as JSON."""
    sig_path = manifest_path.with_suffix(".sig")
    doc = {"key_id": signature.key_id, "signature": base64.b64encode(signature.signature).decode("ascii")}
    sig_path.write_text(json.dumps(doc, sort_keys=True) + "\n")
    return sig_path


async def _upload(
    controller: str,
    token: str,
    directory: pathlib.Path,
    manifest,
    *,
    signature: signing.Signature | None = None,
    tls: tls_mod.ClientTLS | None = None,
):
    from tether.common.admin_client import AdminClient

    async with AdminClient(controller, token=token, tls=tls) as admin:
        try:
            if signature is None:
                return await admin.upload_bundle(directory, manifest)
            return await admin.upload_bundle(
                directory, manifest, signature=signature.signature, key_id=signature.key_id
            )
        except errors.TetherError as e:
            raise click.ClickException(str(e)) from None
