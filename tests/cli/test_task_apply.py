"""`tether task apply DIR -f mltask.yaml`: build, sign, upload, then apply the MLTask with the digest filled in."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import sys

import pytest
import yaml
from test_bundle_cli import ADMIN, controller_address  # noqa: F401 (a fixture)

from tether.cli.demo import example_dir
from tether.cli.task_cmd import load_mltask, with_digest
from tether.common import errors, kube
from tether.common.admin_client import AdminClient
from tether.common.bundle_files import build_manifest
from tether.devtools.emulator import emulated_cluster

EXAMPLE = example_dir("digits")


async def tether(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode()


async def test_apply_uploads_the_bundle_and_creates_then_updates_the_mltask(controller_address, tmp_path):  # noqa: F811
    task_dir = tmp_path / "task"
    shutil.copytree(EXAMPLE / "task", task_dir)
    keys = tmp_path / "release.pem"
    async with emulated_cluster(kubeconfig_path=tmp_path / "kubeconfig.yaml") as cluster:
        env = {"KUBECONFIG": str(cluster.kubeconfig_path), "TETHER_ADMIN_TOKEN": ADMIN}
        rc, out = await tether("keys", "generate", str(keys), env=env)
        assert rc == 0, out
        args = ["task", "apply", str(task_dir), "-f", str(EXAMPLE / "mltask.yaml"), "--controller", controller_address]
        rc, out = await tether(*args, "--sign", str(keys), "--out", str(tmp_path / "out"), env=env)
        assert rc == 0, out
        assert "mltask default/digits-eval created" in out and "signed by" in out
        obj = await cluster.get("default", "digits-eval")
        digest = obj["spec"]["bundle"]["digest"]
        assert digest.startswith("sha256:") and "REPLACE" not in digest
        assert obj["spec"]["target"] == {"matchLabels": {"app": "shop"}}
        async with AdminClient(controller_address, token=ADMIN) as admin:  # uploaded before the apply
            assert await admin.missing_blobs([f.sha256 for f in build_manifest(task_dir).files]) == []

        # Applying the same again changes nothing; a changed task and spec update the object in place.
        rc, out = await tether(*args, env=env)
        assert rc == 0 and "mltask default/digits-eval unchanged" in out, out
        (task_dir / "extra.txt").write_text("a new file: a new digest\n")
        edited = yaml.safe_load((EXAMPLE / "mltask.yaml").read_text())
        del edited["spec"]["resources"]["memoryMB"]  # removed from the file: removed from the object
        edited["metadata"]["labels"] = {"team": "ml"}
        (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
        rc, out = await tether(*args[:3], "-f", str(tmp_path / "edited.yaml"), *args[5:], env=env)
        assert rc == 0 and "mltask default/digits-eval configured" in out, out
        obj = await cluster.get("default", "digits-eval")
        assert obj["spec"]["bundle"]["digest"] not in (digest, None)
        assert "memoryMB" not in obj["spec"]["resources"] and obj["metadata"]["labels"]["team"] == "ml"
        assert obj["metadata"]["generation"] == 2


async def test_a_bad_spec_is_refused_before_anything_is_uploaded_or_applied(controller_address, tmp_path):  # noqa: F811
    task_dir = tmp_path / "task"
    shutil.copytree(EXAMPLE / "task", task_dir)
    (task_dir / "unique.txt").write_text(f"only this test has this file: {tmp_path}\n")
    bad = yaml.safe_load((EXAMPLE / "mltask.yaml").read_text())
    bad["spec"]["rollout"] = {"stages": [{"percent": 50}, {"percent": 20}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    async with emulated_cluster(kubeconfig_path=tmp_path / "kubeconfig.yaml") as cluster:
        env = {"KUBECONFIG": str(cluster.kubeconfig_path), "TETHER_ADMIN_TOKEN": ADMIN}
        rc, out = await tether(
            "task", "apply", str(task_dir), "-f", str(tmp_path / "bad.yaml"),
            "--controller", controller_address, env=env,
        )  # fmt: skip
        assert rc == 1 and "spec.rollout.stages" in out, out
        assert await cluster.get("default", "digits-eval") is None
    unique = next(f.sha256 for f in build_manifest(task_dir).files if f.path == "unique.txt")
    async with AdminClient(controller_address, token=ADMIN) as admin:
        assert await admin.missing_blobs([unique]) == [unique]  # nothing was uploaded


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: Pod\napiVersion: v1\nmetadata: {name: x}\nspec: {}\n", "kind must be MLTask"),
        ("kind: MLTask\napiVersion: tether.dev/v1\nmetadata: {name: x}\nspec: {}\n", "apiVersion must be"),
        ("kind: MLTask\napiVersion: tether.dev/v1alpha1\nmetadata: {}\nspec: {}\n", "metadata.name is required"),
        ("kind: MLTask\napiVersion: tether.dev/v1alpha1\nmetadata: {name: x}\n", "spec is required"),
        ("a: [\n", "cannot read it as YAML"),
        ("---\nkind: MLTask\n---\nkind: MLTask\n", "holds 2 documents"),
    ],
)
def test_a_malformed_file_is_named(tmp_path: pathlib.Path, text: str, words: str) -> None:
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(errors.InvalidArgument, match=words):
        load_mltask(tmp_path / "t.yaml")


def test_with_digest_fills_the_placeholder_and_drops_server_fields() -> None:
    doc = load_mltask(EXAMPLE / "mltask.yaml")
    doc["metadata"]["resourceVersion"] = "7"
    doc["status"] = {"phase": "Pending"}
    out = with_digest(doc, digest="sha256:" + "ab" * 32, namespace="ml")
    assert out["spec"]["bundle"]["digest"] == "sha256:" + "ab" * 32 and out["metadata"]["namespace"] == "ml"
    assert "status" not in out and "resourceVersion" not in out["metadata"]
    assert doc["spec"]["bundle"]["digest"] == "sha256:REPLACE_WITH_BUNDLE_DIGEST"  # the input is not changed


def test_replacing_patch_removes_what_the_file_no_longer_says() -> None:
    live = {"metadata": {"labels": {"a": "1"}}, "spec": {"x": 1, "y": {"p": 1, "q": 2}, "z": [1, 2]}, "status": {}}
    wanted = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": 1, "y": {"p": 3}, "z": [1]}}
    assert kube.replacing_patch(live, wanted) == {
        "spec": {"y": {"q": None, "p": 3}, "z": [1]},
        "metadata": {"labels": {"b": "2"}},
    }
    assert kube.replacing_patch(live, {"metadata": {"labels": {"a": "1"}}, "spec": live["spec"]}) == {}
