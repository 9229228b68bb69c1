"""Defect class 4 (issue 14): manifests whose paths cannot all exist on a device are refused where made and received.

Before the fix a manifest with `a` and `a/b`, or `Model.onnx` and
`model.onnx`, passed the build, the controller and the agent's verification,
and failed (or worse, on a case-insensitive volume, overwrote one file with
another) only at install time on each device. Now `manifest.check_paths`
refuses them in the decoder every side uses, naming both paths.
"""

from __future__ import annotations

import pytest

from tether.agent import bundles, pull
from tether.common import bundle_files, errors, manifest
from tether.proto.v1 import tether_pb2 as pb

TASK = b"def run(ctx):\n    return {}\n"
CONFLICTS = [
    (["a", "a/b"], "needs a directory where"),
    (["A", "a/b"], "needs a directory where"),
    (["B/x", "b"], "is a file but"),  # sorted, the directory comes first here
    (["lib/x/y.py", "lib/x"], "needs a directory where"),
    (["Model.onnx", "model.onnx"], "same file"),
    (["caf\u00e9.txt", "cafe\u0301.txt"], "same file"),  # NFC vs NFD: one name on APFS
    (["STRASSE", "stra\u00dfe"], "same file"),  # casefold
    (["data.", "data"], "same file"),  # NTFS/FAT drop a trailing dot
    (["Dir/a", "dir/b", "DIR"], "directory"),
]


def _body(paths: list[str]) -> bytes:
    files = [manifest.FileEntry(p, manifest.sha256_digest(TASK), len(TASK)) for p in sorted({*paths, "task.py"})]
    return manifest.Manifest(name="t", entrypoint="task.py", files=tuple(files)).canonical_bytes()


@pytest.mark.parametrize(("paths", "why"), CONFLICTS)
def test_the_decoder_refuses_paths_that_cannot_coexist_naming_both(paths, why):
    with pytest.raises(errors.InvalidManifest, match=why) as refused:
        manifest.Manifest.from_bytes(_body(paths))
    assert sum(repr(p) in str(refused.value) for p in paths) >= 2


@pytest.mark.parametrize(("paths", "why"), CONFLICTS[:4])
def test_the_agent_refuses_them_at_verification_not_at_install(paths, why, tmp_path):
    body = _body(paths)
    task = pb.DesiredTask(release="ns/t", version=1, manifest_digest=manifest.sha256_digest(body))
    with pytest.raises(errors.VerificationFailed, match=why):
        pull.verify_manifest(task, pb.GetManifestResponse(manifest=body))
    # And a manifest that skipped the decoder still never reaches the disk.
    store = bundles.BundleStore(tmp_path)
    store.put_blob(manifest.sha256_digest(TASK), TASK)
    files = tuple(manifest.FileEntry(p, manifest.sha256_digest(TASK), len(TASK)) for p in sorted({*paths, "task.py"}))
    with pytest.raises(errors.InvalidManifest, match=why):
        store.install("ns/t", 1, manifest.Manifest(name="t", entrypoint="task.py", files=files))
    assert store.versions("ns/t") == []


def test_tether_bundle_build_refuses_case_duplicates(tmp_path):
    (tmp_path / "bundle.yaml").write_text("name: t\nentrypoint: task.py\n")
    (tmp_path / "task.py").write_bytes(TASK)
    (tmp_path / "Util.py").write_bytes(b"a = 1\n")
    (tmp_path / "util.py").write_bytes(b"a = 2\n")
    with pytest.raises(errors.InvalidManifest, match=r"'Util\.py'.*same file"):
        bundle_files.build_manifest(tmp_path)


async def test_the_controller_refuses_a_conflicting_manifest_and_stores_nothing(admin_client, tmp_path):
    (tmp_path / "task.py").write_bytes(TASK)
    await admin_client.put_blob(tmp_path / "task.py")
    with pytest.raises(errors.InvalidArgument, match="needs a directory where"):
        await admin_client.put_manifest(_body(["a", "a/b"]))
    assert await admin_client.missing_blobs([manifest.sha256_digest(TASK)]) == []
    fine = _body(["a/b", "a/c", "b"])
    assert await admin_client.put_manifest(fine) == manifest.sha256_digest(fine)


def test_distinct_paths_that_merely_share_prefixes_are_fine():
    m = manifest.Manifest.from_bytes(_body(["ab", "a/b", "a.b", "a-b/c"]))
    assert len(m.files) == 5
