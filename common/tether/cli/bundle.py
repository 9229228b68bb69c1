"""`tether bundle build DIR`: hash, write a content-addressed bundle, upload what is missing."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil

import click
from rich.console import Console

from tether.common import errors


def write_local_bundle(directory: pathlib.Path, manifest, out: pathlib.Path) -> pathlib.Path:  # type: ignore[no-untyped-def]
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
def build(directory: pathlib.Path, out: pathlib.Path, controller: str | None, admin_token: str | None) -> None:
    """Hash every file of DIRECTORY (it holds a bundle.yaml), write the bundle, upload missing blobs."""
    from tether.common.bundle_files import build_manifest

    console = Console()
    try:
        manifest = build_manifest(directory)
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None
    path = write_local_bundle(directory, manifest, out)
    console.print(f"bundle [bold]{manifest.name}[/]: {len(manifest.files)} files, {manifest.total_size} bytes")
    console.print(f"manifest written to {path}")
    if controller:
        if not admin_token:
            raise click.ClickException("--admin-token (or TETHER_ADMIN_TOKEN) is required to upload")
        result = asyncio.run(_upload(controller, admin_token, directory, manifest))
        console.print(f"uploaded {result.uploaded_blobs} missing blobs ({result.uploaded_bytes} bytes) to {controller}")
    click.echo(manifest.digest)


async def _upload(controller: str, token: str, directory: pathlib.Path, manifest):  # type: ignore[no-untyped-def]
    from tether.common.admin import AdminClient

    async with AdminClient(controller, token=token) as admin:
        try:
            return await admin.upload_bundle(directory, manifest)
        except errors.TetherError as e:
            raise click.ClickException(str(e)) from None
