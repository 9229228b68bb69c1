"""The operator against a REAL controller (gRPC on loopback, Postgres) on the Kubernetes emulator.

(a) a valid MLTask becomes a release on the controller, and the object's status shows it;
(b) a malformed MLTask gets phase Invalid, a Warning Event naming the field, and the
    controller gets nothing;
and the same flow with `tether operator --kubeconfig FILE` as a separate OS process.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import sys
from typing import Any

import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from operator_helpers import mltask, running_operator, wait_for

from tether.common import auth, manifest
from tether.common.admin_client import AdminClient
from tether.devtools.emulator import EmulatedCluster
from tether.operator import release_client as operator_admin

pytest.importorskip("tether.controller.server")


@pytest.fixture()
async def bundle_digest(admin_client: AdminClient, tmp_path: pathlib.Path) -> str:
    """A small bundle uploaded to the controller; its manifest digest."""
    root = tmp_path / "task"
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 1}\n")
    (root / "labels.txt").write_text("a\nb\n")
    bundle = manifest.hash_directory(root, name="operator-test", entrypoint="task.py")
    upload = await admin_client.upload_bundle(root, bundle)
    return upload.digest


async def _status(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    return ((await cluster.get(None, name)) or {}).get("status") or {}


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def _applied(cluster: EmulatedCluster, name: str, generation: int = 1) -> dict[str, Any] | None:
    s = await _status(cluster, name)
    ok = s.get("observedGeneration") == generation and _condition(s, "Applied").get("status") == "True"
    return s if ok else None


async def test_a_valid_mltask_becomes_a_release_on_the_controller(
    cluster: EmulatedCluster, controller: Any, admin_client: AdminClient, bundle_digest: str
) -> None:
    async with running_operator(cluster, lambda: operator_admin.connect(controller.address, ADMIN_TOKEN)):
        task = mltask(
            "digits",
            target={"matchLabels": {"app": "shop"}},
            trigger={"type": "interval", "intervalSeconds": 600},
            aggregation={"tensors": "mean", "metrics": "weightedMean", "counts": "sum"},
        )
        task["spec"]["bundle"]["digest"] = bundle_digest
        await cluster.create(task)

        status = await wait_for(lambda: _applied(cluster, "digits"), what="the release to be applied")
        (release,) = await admin_client.list_releases()
        assert release.release == "default/digits"
        assert release.manifest_digest == bundle_digest
        assert status["release"] == "default/digits"
        assert status["version"] == release.version
        assert status["manifestDigest"] == bundle_digest
        assert status["phase"] == "Pending"  # no device enrolled: nothing targeted
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Valid": "True",
            "Applied": "True",
            "Paused": "False",
            "Complete": "False",
        }
        assert _condition(status, "Complete")["reason"] == "AwaitingDevices"

        # A spec change is applied as a new generation; a paused release keeps its version.
        await cluster.patch(None, "digits", {"spec": {"paused": True}})
        status = await wait_for(lambda: _applied(cluster, "digits", 2), what="generation 2")
        assert status["version"] == release.version
        assert _condition(status, "Paused")["status"] == "True"

        # Deleting the object deletes the release.
        await cluster.delete(None, "digits")

        async def no_releases() -> bool:
            return not await admin_client.list_releases()

        await wait_for(no_releases, what="the release to be deleted")

        async def object_gone() -> bool:  # the finalizer is removed after the release is deleted
            return await cluster.get(None, "digits") is None

        await wait_for(object_gone, what="the object to be released by the finalizer")


async def test_trigger_and_resources_reach_devices_and_a_resources_change_reapplies(
    cluster: EmulatedCluster, controller: Any, bundle_digest: str
) -> None:
    import grpc

    from tether.proto.v1 import tether_pb2 as pb
    from tether.proto.v1 import tether_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(controller.address) as channel:
        devices = pb_grpc.DeviceServiceStub(channel)
        enrolled = await devices.Enroll(
            pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="phone-1"))
        )
        stream = devices.Subscribe(pb.SubscribeRequest(), metadata=auth.bearer_metadata(enrolled.credential))
        assert (await asyncio.wait_for(stream.read(), 10)).HasField("sync")
        async with running_operator(cluster, lambda: operator_admin.connect(controller.address, ADMIN_TOKEN)):
            task = mltask(
                "ticker",
                trigger={"type": "interval", "intervalSeconds": 90},
                resources={"timeoutSeconds": 20, "memoryMB": 128},
            )
            task["spec"]["bundle"]["digest"] = bundle_digest
            await cluster.create(task)
            first = (await asyncio.wait_for(stream.read(), 15)).notify.task
            assert (first.release, first.version) == ("default/ticker", 1)
            assert json.loads(first.trigger_json) == {"type": "interval", "seconds": 90}
            assert json.loads(first.resources_json) == {"timeoutSeconds": 20, "memoryMB": 128}

            await cluster.patch(None, "ticker", {"spec": {"resources": {"cpuSeconds": 5}}})
            second = (await asyncio.wait_for(stream.read(), 15)).notify.task
            assert second.version == 2
            assert json.loads(second.resources_json) == {"timeoutSeconds": 20, "memoryMB": 128, "cpuSeconds": 5}
            status = await wait_for(lambda: _applied(cluster, "ticker", 2), what="generation 2")
            assert status["version"] == 2
        stream.cancel()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"rollout": {"stages": [{"percent": 50}, {"percent": 10}, {"percent": 100}]}},
            "spec.rollout.stages[1].percent",
        ),
        ({"bundle": {"digest": "sha256:not-hex"}}, "spec.bundle.digest"),
    ],
    ids=["decreasing-stages", "bad-digest"],
)
async def test_a_malformed_mltask_is_invalid_and_the_controller_gets_nothing(
    cluster: EmulatedCluster,
    controller: Any,
    admin_client: AdminClient,
    bundle_digest: str,
    spec: dict[str, Any],
    field: str,
) -> None:
    async with running_operator(cluster, lambda: operator_admin.connect(controller.address, ADMIN_TOKEN)):
        task = mltask("broken")
        task["spec"]["bundle"]["digest"] = bundle_digest
        task["spec"].update(spec)
        await cluster.create(task)

        async def invalid() -> dict[str, Any] | None:
            s = await _status(cluster, "broken")
            return s if s.get("phase") == "Invalid" else None

        status = await wait_for(invalid, what="phase Invalid")
        valid = _condition(status, "Valid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert valid["message"].startswith(f"{field}: ")

        async def warning() -> list[dict[str, Any]]:
            events = await cluster.events_for(None, "broken")
            return [e for e in events if e["type"] == "Warning" and e["reason"] == "InvalidSpec"]

        (event,) = await wait_for(warning, what="a Warning event")
        assert event["message"].startswith(f"{field}: ")

        await asyncio.sleep(0.5)  # a few polls: still nothing is sent
        assert await admin_client.list_releases() == []
        assert "release" not in await _status(cluster, "broken")


async def test_an_unknown_manifest_is_reported_until_the_bundle_is_uploaded(
    cluster: EmulatedCluster, controller: Any, admin_client: AdminClient, tmp_path: pathlib.Path
) -> None:
    root = tmp_path / "late"
    root.mkdir()
    (root / "task.py").write_text("def run(ctx):\n    return {}\n")
    bundle = manifest.hash_directory(root, name="late", entrypoint="task.py")
    async with running_operator(cluster, lambda: operator_admin.connect(controller.address, ADMIN_TOKEN)):
        task = mltask("late")
        task["spec"]["bundle"]["digest"] = bundle.digest
        await cluster.create(task)

        async def missing() -> dict[str, Any] | None:
            s = await _status(cluster, "late")
            return s if _condition(s, "Applied").get("reason") == "ManifestNotFound" else None

        status = await wait_for(missing, what="ManifestNotFound")
        assert status["phase"] == "Failed"
        assert bundle.digest in _condition(status, "Applied")["message"]
        assert await admin_client.list_releases() == []

        await admin_client.upload_bundle(root, bundle)
        status = await wait_for(lambda: _applied(cluster, "late"), what="the retried apply")
        assert status["phase"] == "Pending"


async def test_tether_operator_as_a_separate_process(
    cluster: EmulatedCluster, controller: Any, admin_client: AdminClient, bundle_digest: str
) -> None:
    env = {**os.environ, "TETHER_ADMIN_TOKEN": ADMIN_TOKEN, "TETHER_LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tether.cli.main",
        "operator",
        "--controller",
        controller.address,
        "--kubeconfig",
        str(cluster.kubeconfig_path),
        "--namespace",
        cluster.namespace,
        "--poll-interval",
        "0.2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        task = mltask("remote")
        task["spec"]["bundle"]["digest"] = bundle_digest
        await cluster.create(task)
        status = await wait_for(lambda: _applied(cluster, "remote"), timeout=60, what="the subprocess to apply")
        assert status["release"] == "default/remote"
        assert [r.release for r in await admin_client.list_releases()] == ["default/remote"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        except TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
