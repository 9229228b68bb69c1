"""`tether task apply DIR -f mltask.yaml`: build, sign, upload a task directory and apply its MLTask.

The file's `spec.bundle.digest` (a placeholder in the examples) is replaced by the digest of
the bundle just built. Everything that can be checked is checked before anything is stored:
the file is one MLTask with a name, its spec passes the operator's validation with the new
digest, the bundle builds (and signs); only then are the blobs uploaded and the object applied.
"""

from __future__ import annotations

import asyncio
import copy
import pathlib
from typing import Any

import click
import yaml

from tether.common import errors
from tether.common import tls as tls_mod

API_VERSION = "tether.dev/v1alpha1"


def load_mltask(path: pathlib.Path) -> dict[str, Any]:
    """The one MLTask document of `path`, or InvalidArgument naming what is wrong."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise errors.InvalidArgument(f"{path}: cannot read it as YAML: {e}") from None
    if len(docs) != 1:
        raise errors.InvalidArgument(f"{path}: holds {len(docs)} documents; give exactly one MLTask")
    doc = docs[0]
    if not isinstance(doc, dict) or doc.get("kind") != "MLTask":
        raise errors.InvalidArgument(f"{path}: kind must be MLTask")
    if doc.get("apiVersion") != API_VERSION:
        raise errors.InvalidArgument(f"{path}: apiVersion must be {API_VERSION}, not {doc.get('apiVersion')!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise errors.InvalidArgument(f"{path}: metadata.name is required")
    if not isinstance(doc.get("spec"), dict):
        raise errors.InvalidArgument(f"{path}: spec is required and must be an object")
    return doc


def with_digest(doc: dict[str, Any], *, digest: str, namespace: str) -> dict[str, Any]:
    """A copy of the MLTask with spec.bundle.digest set and its namespace decided; status dropped."""
    out = copy.deepcopy(doc)
    out.pop("status", None)
    bundle = out["spec"].get("bundle")
    out["spec"]["bundle"] = {**(bundle if isinstance(bundle, dict) else {}), "digest": digest}
    out["metadata"]["namespace"] = namespace
    for key in ("resourceVersion", "uid", "generation", "creationTimestamp", "managedFields"):
        out["metadata"].pop(key, None)
    return out


@click.group()
def task() -> None:
    """Build, upload and apply tasks (a task directory and its MLTask)."""


@task.command("apply")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option(
    "-f",
    "--filename",
    "mltask_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The MLTask manifest; its spec.bundle.digest is filled in.",
)
@click.option("-n", "--namespace", default=None, help="Namespace (default: the file's, else the context's).")
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="kubeconfig file (default: in-cluster).")
@click.option("--controller", envvar="TETHER_CONTROLLER", required=True, help="host:port of the controller.")
@click.option("--admin-token", envvar="TETHER_ADMIN_TOKEN", required=True, help="Admin token [env TETHER_ADMIN_TOKEN].")
@click.option(
    "--sign",
    "sign_key",
    envvar="TETHER_SIGNING_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    default=None,
    help="Ed25519 private key to sign the manifest with [env TETHER_SIGNING_KEY].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default=pathlib.Path(".tether"),
    show_default=True,
    help="Where to write the content-addressed bundle.",
)
@tls_mod.client_options
def apply(
    directory: pathlib.Path,
    mltask_file: pathlib.Path,
    namespace: str | None,
    kubeconfig: str | None,
    controller: str,
    admin_token: str,
    sign_key: pathlib.Path | None,
    out: pathlib.Path,
    tls: tls_mod.ClientTLS,
) -> None:
    """Build DIRECTORY's bundle, upload it, and apply the MLTask of -f with the bundle's digest."""
    try:
        click.echo(
            asyncio.run(
                _apply(
                    directory=directory,
                    mltask_file=mltask_file,
                    namespace=namespace,
                    kubeconfig=kubeconfig,
                    controller=controller,
                    admin_token=admin_token,
                    sign_key=sign_key,
                    out=out,
                    tls=tls,
                )
            )
        )
    except errors.TetherError as e:
        raise click.ClickException(str(e)) from None


async def _apply(
    *,
    directory: pathlib.Path,
    mltask_file: pathlib.Path,
    namespace: str | None,
    kubeconfig: str | None,
    controller: str,
    admin_token: str,
    sign_key: pathlib.Path | None,
    out: pathlib.Path,
    tls: tls_mod.ClientTLS,
) -> str:
    from tether.cli import bundle
    from tether.common import kube
    from tether.common.admin_client import AdminClient
    from tether.common.bundle_files import build_manifest
    from tether.operator import validate

    doc = load_mltask(mltask_file)
    manifest = build_manifest(directory)
    signature = bundle.sign_manifest(manifest, sign_key) if sign_key is not None else None
    credentials = await kube.load(kubeconfig)  # a bad kubeconfig is refused before anything is stored
    ns = namespace or doc["metadata"].get("namespace") or credentials.namespace
    obj = with_digest(doc, digest=manifest.digest, namespace=ns)
    validate.validate(obj["spec"])  # the operator's checks, with the real digest
    path = bundle.write_local_bundle(directory, manifest, out)
    if signature is not None:
        bundle.write_signature(path, signature)
    async with AdminClient(controller, token=admin_token, tls=tls) as admin:
        if signature is None:
            uploaded = await admin.upload_bundle(directory, manifest)
        else:
            uploaded = await admin.upload_bundle(
                directory, manifest, signature=signature.signature, key_id=signature.key_id
            )
    async with kube.KubeClient(credentials) as client:
        outcome, _ = await client.apply_mltask(obj)
    signed = f", signed by {signature.key_id}" if signature is not None else ""
    return (
        f"bundle {manifest.name} {manifest.digest}{signed}: uploaded {uploaded.uploaded_blobs} missing blobs "
        f"({uploaded.uploaded_bytes} bytes)\nmltask {ns}/{obj['metadata']['name']} {outcome}"
    )
