"""Defect class 1 (issue 14): nothing an install writes may reach the shared blob cache.

Installed files are hard links to the verified blobs every release shares.
Before the fix the agent wrote its manifest copy into the install tree, so a
bundle file at that path (`.tether-manifest.json`) made it write through the
link into a cached blob: as root, another release's installed file changed
content. Now the agent keeps its bookkeeping beside the tree, reserved names
are refused where a manifest is made (`tether bundle build`), received
(controller PutManifest, agent verification) and installed, and the store
never opens an existing file in an install tree for writing.
"""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

from tether.agent import bundles, pull
from tether.common import bundle_files, errors, manifest
from tether.proto.v1 import tether_pb2 as pb

SHARED = b"def run(ctx):\n    return {'sample_count': 1}\n"


def _entry(path: str, data: bytes) -> manifest.FileEntry:
    return manifest.FileEntry(path=path, sha256=manifest.sha256_digest(data), size=len(data))


def _manifest(*files: manifest.FileEntry) -> manifest.Manifest:
    """A manifest made without the decoder's checks: what a hostile or buggy producer could hand the store."""
    return manifest.Manifest(name="t", entrypoint="task.py", files=tuple(sorted(files, key=lambda f: f.path)))


def test_a_bundle_file_at_the_agents_bookkeeping_path_cannot_change_a_cached_blob(tmp_path):
    store = bundles.BundleStore(tmp_path)
    store.put_blob(manifest.sha256_digest(SHARED), SHARED)
    good = _manifest(_entry("task.py", SHARED))
    store.install("ns/other", 1, good)
    hostile = _manifest(_entry("task.py", SHARED), _entry(".tether-manifest.json", SHARED))

    with pytest.raises(errors.InvalidManifest, match="reserved"):
        store.install("ns/hostile", 1, hostile)

    assert store.blob_path(manifest.sha256_digest(SHARED)).read_bytes() == SHARED
    assert (store.install_dir("ns/other", 1) / "task.py").read_bytes() == SHARED
    assert store.versions("ns/hostile") == []


def test_an_install_tree_holds_the_bundle_and_nothing_the_agent_wrote(tmp_path):
    store = bundles.BundleStore(tmp_path)
    data = {"task.py": SHARED, "lib/util.py": b"x = 1\n", "copy.py": SHARED}
    for blob in set(data.values()):
        store.put_blob(manifest.sha256_digest(blob), blob)
    m = _manifest(*(_entry(p, d) for p, d in data.items()))
    final = store.install("ns/t", 3, m)

    on_disk = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert on_disk == sorted(data)
    assert store.installed_manifest("ns/t", 3) == m
    assert store.manifest_path("ns/t", 3).parent == final.parent  # beside the tree, not in it


def test_where_links_fail_files_are_copied_into_new_files_never_through_an_existing_one(tmp_path, monkeypatch):
    store = bundles.BundleStore(tmp_path)
    store.put_blob(manifest.sha256_digest(SHARED), SHARED)
    blob = store.blob_path(manifest.sha256_digest(SHARED))
    dest = tmp_path / "dest.py"
    os.link(blob, dest)  # a path that already is a link to the cache
    with pytest.raises(errors.InvalidManifest, match="two bundle files at one path"):
        bundles._place(blob, dest)

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(errors.InvalidManifest):
        bundles._place(blob, dest)
    assert blob.read_bytes() == SHARED
    final = store.install("ns/copied", 1, _manifest(_entry("task.py", SHARED)))
    copied = final / "task.py"
    assert copied.read_bytes() == SHARED and copied.stat().st_ino != blob.stat().st_ino


def test_installs_of_the_old_layout_keep_working_after_the_upgrade(tmp_path):
    store = bundles.BundleStore(tmp_path)
    store.put_blob(manifest.sha256_digest(SHARED), SHARED)
    m = _manifest(_entry("task.py", SHARED))
    final = store.install("ns/t", 2, m)
    # What an agent before the fix left behind: the manifest inside the tree.
    os.rename(store.manifest_path("ns/t", 2), final / bundles.LEGACY_MANIFEST_FILE)

    reopened = bundles.BundleStore(tmp_path)

    assert reopened.installed_manifest("ns/t", 2) == m
    assert not (final / bundles.LEGACY_MANIFEST_FILE).exists()
    assert reopened.referenced_blobs() == {manifest.sha256_digest(SHARED)}


def test_tether_bundle_build_refuses_a_reserved_name(tmp_path):
    (tmp_path / "bundle.yaml").write_text("name: t\nentrypoint: task.py\n")
    (tmp_path / "task.py").write_bytes(SHARED)
    (tmp_path / ".tether-manifest.json").write_bytes(b"{}")
    with pytest.raises(errors.InvalidManifest, match=r"'.tether-manifest.json' uses a name reserved"):
        bundle_files.build_manifest(tmp_path)


@pytest.mark.parametrize("path", [".tether-manifest.json", "sub/.TETHER-state", ".Tether"])
def test_the_decoder_refuses_reserved_names_so_the_agent_refuses_them_on_receipt(path):
    body = _manifest(_entry("task.py", SHARED), _entry(path, b"x")).canonical_bytes()
    with pytest.raises(errors.InvalidManifest, match="reserved for the agent"):
        manifest.Manifest.from_bytes(body)
    task = pb.DesiredTask(release="ns/t", version=1, manifest_digest=manifest.sha256_digest(body))
    with pytest.raises(errors.VerificationFailed, match="reserved for the agent"):
        pull.verify_manifest(task, pb.GetManifestResponse(manifest=body))


async def test_the_controller_refuses_a_manifest_with_a_reserved_name_and_stores_nothing(admin_client, tmp_path):
    for name, data in (("task.py", SHARED), ("evil", b"{}")):
        (tmp_path / name).write_bytes(data)
        await admin_client.put_blob(tmp_path / name)
    body = _manifest(_entry("task.py", SHARED), _entry(".tether-manifest.json", b"{}")).canonical_bytes()
    with pytest.raises(errors.InvalidArgument, match="reserved for the agent"):
        await admin_client.put_manifest(body)
    good = _manifest(_entry("task.py", SHARED)).canonical_bytes()
    assert await admin_client.put_manifest(good) == manifest.sha256_digest(good)


def test_reserved_names_are_exactly_the_agents(tmp_path):
    # Ordinary dot files stay allowed.
    m = manifest.Manifest.from_bytes(_manifest(_entry("task.py", SHARED), _entry(".config/x", b"1")).canonical_bytes())
    assert [f.path for f in m.files] == [".config/x", "task.py"]
    assert pathlib.PurePosixPath(bundles.LEGACY_MANIFEST_FILE).name.startswith(manifest.RESERVED_PREFIX)
