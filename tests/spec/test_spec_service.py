"""ApplyRelease over real gRPC: typed fields and the deprecated JSON ones are the same release to the controller."""

from __future__ import annotations

import pathlib

from tether.common import manifest
from tether.spec import resources, selectors, staging

TARGET = {"matchLabels": {"os": "android"}, "matchVersions": {"appVersion": ">=10"}}
ROLLOUT = {
    "version": 1,
    "salt": "ns/t",
    "stage": 0,
    "action": "progress",
    "stages": [{"percent": 10}, {"percent": 100}],
}


async def test_a_typed_apply_and_a_json_apply_of_the_same_content_are_one_version(admin_client, tmp_path) -> None:
    root = pathlib.Path(tmp_path / "bundle")
    root.mkdir()
    (root / "task.py").write_bytes(b"def run(ctx):\n    return {}\n")
    bundle = manifest.hash_directory(root, name="t", entrypoint="task.py")
    upload = await admin_client.upload_bundle(root, bundle)

    first = await admin_client.apply_release(
        release="ns/t",
        manifest_digest=upload.digest,
        target=selectors.parse_target(TARGET),
        resources=resources.Resources(memory_mb=64),
        rollout=staging.parse_rollout(ROLLOUT),
    )
    again = await admin_client.apply_release(
        release="ns/t", manifest_digest=upload.digest, target=TARGET, resources={"memoryMB": 64}, rollout=ROLLOUT
    )
    assert (first.version, first.changed) == (1, True)
    assert (again.version, again.changed) == (1, False)
    moved = await admin_client.apply_release(
        release="ns/t", manifest_digest=upload.digest, target=selectors.parse_target({}), rollout=None
    )
    assert (moved.version, moved.changed) == (2, True)
